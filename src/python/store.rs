//! `StoreCore`: the SQLite log from Python. Every call queues a request for the writer thread
//! and returns a loop future; the writer answers a whole batch at once, and one
//! `call_soon_threadsafe` per batch and loop resolves all its futures on the loop thread. The
//! writer thread holds the GIL only for that hand-off, never while SQLite works, and uses
//! `Python::try_attach` so it never touches a finalizing interpreter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::python::errors;
use crate::store::log::{DeadRow, NewEvent, StoredRow, Synchronous};
use crate::store::writer::{Op, Reply, Sink, Writer};
use crate::store::StoreError;

type Done = Vec<(u64, crate::store::Result<Reply>)>;

/// A request's future and the loop it belongs to.
type Waiting = (Py<PyAny>, Py<PyAny>);

#[derive(Default)]
struct Shared {
    /// token -> (future, its loop)
    pending: Mutex<HashMap<u64, Waiting>>,
    /// Results not yet handed to their futures.
    done: Mutex<Done>,
}

/// Called on the loop thread (scheduled by the writer) to resolve finished requests.
#[pyclass(frozen, name = "StoreResolver", module = "oxbus._oxbus")]
pub struct PyResolver {
    shared: Arc<Shared>,
}

#[pymethods]
impl PyResolver {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        let done = std::mem::take(&mut *self.shared.done.lock());
        for (token, result) in done {
            let Some((fut, _)) = self.shared.pending.lock().remove(&token) else {
                continue;
            };
            let fut = fut.bind(py);
            if fut.call_method0(intern!(py, "done"))?.is_truthy()? {
                continue; // cancelled by its awaiter
            }
            match result
                .map_err(|e| to_py(&e))
                .and_then(|r| reply_to_py(py, r))
            {
                Ok(v) => fut.call_method1(intern!(py, "set_result"), (v,))?,
                Err(e) => fut.call_method1(intern!(py, "set_exception"), (e.value(py),))?,
            };
        }
        Ok(())
    }
}

struct PySink {
    shared: Arc<Shared>,
    resolver: Py<PyResolver>,
}

impl Sink for PySink {
    fn deliver(&self, results: Done) {
        let tokens: Vec<u64> = results.iter().map(|(t, _)| *t).collect();
        self.shared.done.lock().extend(results);
        // One GIL acquisition per batch; skipped entirely if the interpreter is finalizing.
        let _ = Python::try_attach(|py| {
            let mut loops: Vec<Py<PyAny>> = Vec::new();
            {
                let pending = self.shared.pending.lock();
                for t in &tokens {
                    if let Some((_, l)) = pending.get(t) {
                        if !loops.iter().any(|x| x.is(l)) {
                            loops.push(l.clone_ref(py));
                        }
                    }
                }
            }
            for l in loops {
                // A closed loop refuses; its futures are gone with it.
                let _ = l.bind(py).call_method1(
                    intern!(py, "call_soon_threadsafe"),
                    (self.resolver.bind(py),),
                );
            }
        });
    }
}

fn to_py(e: &StoreError) -> PyErr {
    match e {
        StoreError::Concurrency { .. } => errors::concurrency_error(e.to_string()),
        StoreError::Invalid(_) | StoreError::Sqlite { .. } | StoreError::Closed(_) => {
            errors::storage_error(e.to_string())
        }
    }
}

fn row_to_py(py: Python<'_>, r: StoredRow) -> PyResult<Bound<'_, PyTuple>> {
    (
        r.position,
        r.stream_id,
        r.version,
        r.event_type,
        r.event_version,
        r.data,
        r.metadata,
        r.event_id,
        r.occurred_at,
        r.recorded_at,
    )
        .into_pyobject(py)
}

fn dead_to_py(py: Python<'_>, d: DeadRow) -> PyResult<Bound<'_, PyTuple>> {
    (
        d.id,
        d.position,
        d.subscription,
        d.attempts,
        d.first_failed_at,
        d.last_failed_at,
        d.error_type,
        d.error_message,
        d.traceback,
    )
        .into_pyobject(py)
}

fn reply_to_py(py: Python<'_>, r: Reply) -> PyResult<Py<PyAny>> {
    Ok(match r {
        Reply::Appended {
            version,
            first_position,
        } => (version, first_position)
            .into_pyobject(py)?
            .into_any()
            .unbind(),
        Reply::Rows(rows) => {
            let items = rows
                .into_iter()
                .map(|r| row_to_py(py, r))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        Reply::Row(r) => match r {
            Some(r) => row_to_py(py, r)?.into_any().unbind(),
            None => py.None(),
        },
        Reply::Snapshot(s) => match s {
            Some(s) => (s.stream_id, s.version, s.state, s.taken_at)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
            None => py.None(),
        },
        Reply::Int(n) => n.into_pyobject(py)?.into_any().unbind(),
        Reply::Unit => py.None(),
        Reply::Dead(ds) => {
            let items = ds
                .into_iter()
                .map(|d| dead_to_py(py, d))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
    })
}

/// The native half of `oxbus.SqliteEventStore`.
#[pyclass(frozen, name = "StoreCore", module = "oxbus._oxbus")]
pub struct PyStoreCore {
    writer: Writer,
    shared: Arc<Shared>,
    next: AtomicU64,
    path: String,
}

/// An event to append as given from Python: (event_id, event_type, event_version, data JSON,
/// metadata JSON, occurred_at ISO or None).
type PyNewEvent = (String, String, i64, String, String, Option<String>);

fn new_events(events: Vec<PyNewEvent>) -> Vec<NewEvent> {
    events
        .into_iter()
        .map(
            |(event_id, event_type, event_version, data, metadata, occurred_at)| NewEvent {
                event_id,
                event_type,
                event_version,
                data,
                metadata,
                occurred_at,
            },
        )
        .collect()
}

impl PyStoreCore {
    fn submit(&self, py: Python<'_>, op: Op) -> PyResult<Py<PyAny>> {
        let asyncio = py.import(intern!(py, "asyncio"))?;
        let loop_ = asyncio.call_method0(intern!(py, "get_running_loop"))?;
        let fut = loop_.call_method0(intern!(py, "create_future"))?;
        let token = self.next.fetch_add(1, Relaxed);
        self.shared
            .pending
            .lock()
            .insert(token, (fut.clone().unbind(), loop_.unbind()));
        if let Err(e) = self.writer.submit(token, op) {
            self.shared.pending.lock().remove(&token);
            return Err(to_py(&e));
        }
        Ok(fut.unbind())
    }
}

#[pymethods]
impl PyStoreCore {
    #[new]
    #[pyo3(signature = (path, synchronous="normal"))]
    fn new(py: Python<'_>, path: String, synchronous: &str) -> PyResult<Self> {
        let sync = Synchronous::parse(synchronous)
            .map_err(|e| errors::configuration_error(e.to_string()))?;
        let shared = Arc::new(Shared::default());
        let resolver = Py::new(
            py,
            PyResolver {
                shared: Arc::clone(&shared),
            },
        )?;
        let sink = Arc::new(PySink {
            shared: Arc::clone(&shared),
            resolver,
        });
        let writer = py
            .detach(|| Writer::open(&path, sync, sink))
            .map_err(|e| to_py(&e))?;
        Ok(Self {
            writer,
            shared,
            next: AtomicU64::new(1),
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
        py.detach(|| self.writer.close());
    }

    /// Appends to a stream -> future of (new version, first position).
    #[pyo3(signature = (stream_id, events, expected_version=None))]
    fn append(
        &self,
        py: Python<'_>,
        stream_id: String,
        events: Vec<PyNewEvent>,
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
                events: new_events(events),
                expected: expected_version,
            },
        )
    }

    /// Records a finished delivery (no future: it is committed with the next batch).
    fn mark_done(&self, subscription: String, position: i64) -> PyResult<()> {
        self.writer
            .submit(
                0,
                Op::MarkDone {
                    subscription,
                    position,
                },
            )
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
        };
        self.submit(py, Op::AddDeadLetter(d))
    }

    fn dead_letters(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.submit(py, Op::DeadLetters)
    }

    #[pyo3(signature = (ids=None))]
    fn remove_dead_letters(&self, py: Python<'_>, ids: Option<Vec<i64>>) -> PyResult<Py<PyAny>> {
        self.submit(py, Op::RemoveDeadLetters(ids))
    }
}
