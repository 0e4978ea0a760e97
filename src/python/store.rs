//! `StoreCore`: the SQLite log from Python. Every call queues a request for the writer thread
//! and returns a loop future; the writer answers a whole batch at once, and one
//! `call_soon_threadsafe` per batch and loop resolves all its futures on the loop thread. The
//! writer thread holds the GIL only for that hand-off, never while SQLite works, and uses
//! `runtime::attach` so it never touches an exiting interpreter.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::exceptions::PyRuntimeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString, PyTuple, PyType};

use crate::python::completion::{Completions, Outcome, PyResolver};
use crate::python::envelope::{self, new_event_id};
use crate::python::errors::to_py;
use crate::python::json::records::Metadata;
use crate::python::pacing::PyTurnEnd;
use crate::python::runtime;
use crate::python::{errors, events, json};
use crate::store::log::{DeadRow, NewEvent, StoredRow, Synchronous};
use crate::store::now::Logged;
use crate::store::pacing::Pacing;
use crate::store::saga::{DeadlineRow, SagaRow, SagaWrite};
use crate::store::writer::{Op, Reply, Sink, Writer};
use crate::store::StoreError;
use rusqlite::types::Value;

type Done = Vec<(u64, crate::store::Result<Reply>)>;

struct PySink {
    completions: Arc<Completions>,
    resolver: Py<PyResolver>,
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
        d.key_hash,
        d.parked_behind,
    )
        .into_pyobject(py)
}

fn value_to_py(py: Python<'_>, v: Value) -> PyResult<Bound<'_, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Integer(i) => i.into_pyobject(py)?.into_any(),
        Value::Real(f) => f.into_pyobject(py)?.into_any(),
        Value::Text(t) => t.into_pyobject(py)?.into_any(),
        Value::Blob(b) => pyo3::types::PyBytes::new(py, &b).into_any(),
    })
}

fn value_of(v: &Bound<'_, PyAny>) -> PyResult<Value> {
    if v.is_none() {
        Ok(Value::Null)
    } else if let Ok(b) = v.cast::<PyBool>() {
        Ok(Value::Integer(i64::from(b.is_true())))
    } else if let Ok(i) = v.extract::<i64>() {
        Ok(Value::Integer(i))
    } else if let Ok(f) = v.extract::<f64>() {
        Ok(Value::Real(f))
    } else if let Ok(s) = v.extract::<String>() {
        Ok(Value::Text(s))
    } else if let Ok(b) = v.extract::<Vec<u8>>() {
        Ok(Value::Blob(b))
    } else {
        Err(errors::configuration_error(format!(
            "a query parameter must be None, int, float, str or bytes, got {}",
            v.repr()?
        )))
    }
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
        Reply::Positions(ps) => PyList::new(py, ps)?.into_any().unbind(),
        Reply::Unit => py.None(),
        Reply::Table(rows) => {
            let items = rows
                .into_iter()
                .map(|r| {
                    let cells = r
                        .into_iter()
                        .map(|v| value_to_py(py, v))
                        .collect::<PyResult<Vec<_>>>()?;
                    PyTuple::new(py, cells)
                })
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        Reply::Requeued(rows) => PyList::new(py, rows)?.into_any().unbind(),
        Reply::Saga(positions) => match positions {
            Some(ps) => PyList::new(py, ps)?.into_any().unbind(),
            None => py.None(),
        },
        Reply::Dead(ds) => {
            let items = ds
                .into_iter()
                .map(|d| dead_to_py(py, d))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
    })
}

/// Requests made during one turn of the loop, sent to the writer together at its end.
#[derive(Default)]
struct Outbox {
    ops: Mutex<Vec<(u64, Op)>>,
}

/// Sends the outbox to the writer; scheduled with `loop.call_soon` by the first request of a
/// loop turn, so requests from many tasks reach the writer in one message and share one commit.
#[pyclass(frozen, name = "StoreFlusher", module = "oxbus._oxbus")]
pub struct PyFlusher {
    writer: Arc<Writer>,
    outbox: Arc<Outbox>,
    completions: Arc<Completions>,
    pacing: Arc<Pacing>,
}

impl PyFlusher {
    fn flush(&self, py: Python<'_>) {
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
    /// their futures (see `pacing`); hands the batch back when it cannot: other requests in it,
    /// earlier bus-log requests still unsettled, futures of another loop, the writer busy, or
    /// an error (the writer thread then runs it, isolating the failing request).
    fn commit_now(&self, py: Python<'_>, mut ops: Vec<(u64, Op)>) -> Result<(), Vec<(u64, Op)>> {
        let all_logs = !ops.is_empty()
            && ops
                .iter()
                .all(|(t, op)| *t != 0 && matches!(op, Op::Log { .. }));
        if !all_logs || self.pacing.waiting.load(Relaxed) != ops.len() {
            return Err(ops);
        }
        let Ok(loop_) = Completions::running_loop(py) else {
            return Err(ops);
        };
        let tokens: Vec<u64> = ops.iter().map(|(t, _)| *t).collect();
        if !self.completions.all_on(&tokens, &loop_) {
            return Err(ops);
        }
        let mut counts = Vec::with_capacity(ops.len());
        let mut items = Vec::new();
        for (_, op) in &mut ops {
            if let Op::Log { items: part } = op {
                counts.push(part.len());
                items.append(part);
            }
        }
        let writer = &self.writer;
        let logged = py.detach(|| writer.log_now(&items));
        let positions = match logged {
            Some(Ok(Logged::Positions(p))) => p,
            Some(Ok(Logged::Unconfirmed(p))) => {
                // The writer thread checks (and saves) the WAL before they are acknowledged.
                let mut rest = p.into_iter();
                return Err(tokens
                    .into_iter()
                    .zip(counts)
                    .map(|(t, n)| (t, Op::Confirm(rest.by_ref().take(n).collect())))
                    .collect());
            }
            Some(Err(_)) | None => {
                let mut rest = items.into_iter();
                return Err(tokens
                    .into_iter()
                    .zip(counts)
                    .map(|(t, n)| {
                        let items = rest.by_ref().take(n).collect();
                        (t, Op::Log { items })
                    })
                    .collect());
            }
        };
        let mut rest = positions.into_iter();
        for (t, n) in tokens.into_iter().zip(counts) {
            let part: Vec<i64> = rest.by_ref().take(n).collect();
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

/// The native half of `oxbus.SqliteEventStore`.
#[pyclass(frozen, name = "StoreCore", module = "oxbus._oxbus")]
pub struct PyStoreCore {
    writer: Arc<Writer>,
    completions: Arc<Completions>,
    outbox: Arc<Outbox>,
    flusher: Py<PyFlusher>,
    /// When a publish may commit on the asyncio thread (see `pacing`).
    pacing: Arc<Pacing>,
    turn_end: Py<PyTurnEnd>,
    path: String,
}

pub fn lookup<'py>(
    event: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let found = match event.cast::<PyDict>() {
        Ok(d) => d.get_item(name)?,
        Err(_) => event.getattr_opt(name)?,
    };
    Ok(found.filter(|v| !v.is_none()))
}

/// `DomainEvent`'s lazy identity attributes, as bits.
const EVENT_ID: u8 = 1;
const OCCURRED_AT: u8 = 2;
const EVENT_TYPE: u8 = 4;
const CORRELATION_ID: u8 = 8;
const CAUSATION_ID: u8 = 16;
const IDENTITY: [(&str, u8); 5] = [
    ("event_id", EVENT_ID),
    ("occurred_at", OCCURRED_AT),
    ("event_type", EVENT_TYPE),
    ("correlation_id", CORRELATION_ID),
    ("causation_id", CAUSATION_ID),
];

/// Per class (kept alive by the entry): which identity attributes are still `DomainEvent`'s
/// own lazy defaults, i.e. not overridden by the class or a base.
type LazyByClass = Mutex<rustc_hash::FxHashMap<usize, (Py<PyType>, u8)>>;
static LAZY: pyo3::sync::PyOnceLock<LazyByClass> = pyo3::sync::PyOnceLock::new();

fn lazy_defaults(ty: &Bound<'_, PyType>) -> PyResult<u8> {
    let py = ty.py();
    let cache = LAZY.get_or_init(py, Mutex::default);
    if let Some((_, bits)) = cache.lock().get(&(ty.as_ptr() as usize)) {
        return Ok(*bits);
    }
    let mut bits = 0;
    if ty.hasattr(intern!(py, "__oxbus_domain_event__"))? {
        let base = py.import("oxbus.events")?.getattr("DomainEvent")?;
        let base_dict = base.getattr("__dict__")?;
        let mro = ty.getattr(intern!(py, "__mro__"))?;
        for (name, bit) in IDENTITY {
            let own = base_dict.get_item(name)?;
            for cls in mro.try_iter()? {
                let found = cls?.getattr("__dict__")?.call_method1("get", (name,))?;
                if !found.is_none() {
                    if found.is(&own) {
                        bits |= bit;
                    }
                    break;
                }
            }
        }
    }
    cache
        .lock()
        .insert(ty.as_ptr() as usize, (ty.clone().unbind(), bits));
    Ok(bits)
}

/// Encodes one event into a log record, in Rust: type key, version, id, data, metadata
/// (correlation from `correlation_id`, else the handler being run — with its subscription name —
/// else the event's own), time. A `DomainEvent`'s lazy identity defaults are computed here
/// (and cached on the instance, as its descriptors would), not by calling into Python.
pub fn record_of<'py>(
    event: &Bound<'py, PyAny>,
    correlation_id: Option<&Bound<'py, PyAny>>,
) -> PyResult<NewEvent> {
    let py = event.py();
    if event.is_none() {
        return Err(events::none_event_error());
    }
    let (lazy, dict) = if event.cast::<PyDict>().is_ok() {
        (0, None)
    } else {
        match lazy_defaults(&event.get_type())? {
            0 => (0, None),
            bits => match event.getattr_opt(intern!(py, "__dict__"))? {
                Some(d) => (bits, d.cast_into::<PyDict>().ok()),
                None => (0, None),
            },
        }
    };
    let lazy = if dict.is_some() { lazy } else { 0 };
    // An identity attribute: (its value, whether it is the lazy default never computed). For
    // a DomainEvent it is read from the instance `__dict__`, without running its descriptor.
    let ident =
        |name: &Bound<'py, PyString>, bit: u8| -> PyResult<(Option<Bound<'py, PyAny>>, bool)> {
            match &dict {
                Some(d) if lazy & bit != 0 => Ok(match d.get_item(name)? {
                    Some(v) => (Some(v).filter(|v| !v.is_none()), false),
                    None => (None, true),
                }),
                _ => Ok((lookup(event, name)?, false)),
            }
        };
    let event_type = match ident(intern!(py, "event_type"), EVENT_TYPE)? {
        (_, true) => event.get_type().name()?.to_str()?.to_owned(),
        _ => events::type_key(event)?,
    };
    let event_version = match lookup(event, intern!(py, "event_version"))? {
        Some(v) if !v.is_instance_of::<PyBool>() => v.extract::<i64>().unwrap_or(1),
        _ => 1,
    };
    let event_id = match ident(intern!(py, "event_id"), EVENT_ID)? {
        (Some(v), _) => v.str()?.to_string(),
        (None, true) => {
            let id = new_event_id();
            if let Some(d) = &dict {
                d.set_item(intern!(py, "event_id"), &id)?; // the event keeps the id it was logged with
            }
            id
        }
        (None, false) => new_event_id(),
    };
    // Metadata: correlation and causation and, for an event published by a handler, its
    // subscription (`oxbus flow` draws handler -> event edges from it).
    let parent = envelope::get_current(py)?.filter(|env| !env.event_ref().is(event));
    let meta = match (correlation_id, parent) {
        (Some(c), _) => Metadata {
            correlation_id: meta_value(Some(c))?,
            ..Metadata::default()
        },
        (None, Some(env)) => Metadata {
            correlation_id: meta_value(Some(&env.correlation(py)?))?,
            causation_id: meta_value(Some(&env.id(py)?))?,
            subscription: env.subscription().map(|s| s.to_string()),
        },
        (None, None) => Metadata {
            correlation_id: match ident(intern!(py, "correlation_id"), CORRELATION_ID)? {
                (_, true) => Some(serde_json::Value::String(event_id.clone())), // its default
                (v, false) => meta_value(v.as_ref())?,
            },
            causation_id: meta_value(ident(intern!(py, "causation_id"), CAUSATION_ID)?.0.as_ref())?,
            subscription: None,
        },
    };
    let occurred_at = match ident(intern!(py, "occurred_at"), OCCURRED_AT)? {
        (Some(t), _) => json::isoformat(&t)?,
        (None, true) => default_occurred_at(event, dict.as_ref())?,
        (None, false) => None,
    };
    Ok(NewEvent {
        event_id,
        event_type,
        event_version,
        data: json::encode(event)?,
        metadata: serde_json::to_string(&meta)
            .map_err(|e| errors::serialization_error(format!("cannot encode metadata: {e}")))?,
        occurred_at,
    })
}

/// A `DomainEvent`'s `occurred_at` default, as its descriptor makes it (the creation time in
/// UTC, kept on the instance), in ISO 8601.
fn default_occurred_at(
    event: &Bound<'_, PyAny>,
    dict: Option<&Bound<'_, PyDict>>,
) -> PyResult<Option<String>> {
    let py = event.py();
    let d = dict.expect("lazy attributes come with a __dict__");
    let at = match d.get_item(intern!(py, "_oxbus_ts"))? {
        Some(ts) if ts.is_truthy()? => {
            let utc = pyo3::types::PyTzInfo::utc(py)?;
            let at = pyo3::types::PyDateTime::from_timestamp(py, ts.extract()?, Some(&utc))?;
            d.set_item(intern!(py, "occurred_at"), &at)?;
            at.into_any()
        }
        _ => event.getattr(intern!(py, "occurred_at"))?,
    };
    json::isoformat(&at)
}

/// One metadata value: None for None or a missing value, a `str` as it is, anything else as
/// the encoder writes it.
fn meta_value(v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<serde_json::Value>> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    if let Ok(s) = v.cast_exact::<PyString>() {
        return Ok(Some(serde_json::Value::String(s.to_str()?.to_owned())));
    }
    let text = json::encode(v)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| errors::serialization_error(format!("cannot encode metadata {text}: {e}")))
}

/// The bus log's stream for an event: `$bus:<key>`, or `$bus` without a key.
fn log_stream(event: &Bound<'_, PyAny>, key: Option<&Bound<'_, PyAny>>) -> PyResult<String> {
    Ok(match events::event_key(event, key)? {
        // Refused here, before anything is written, if the log could not give it back.
        Some(k) => format!("$bus:{}", events::portable_key(&k)?.str()?),
        None => "$bus".to_owned(),
    })
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
    /// `settled()` once it has dispatched the event (see `pacing`).
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
