//! Loop futures completed from another thread, a batch at a time.
//!
//! A request registers a future (on the running loop) under a token and hands the token to a
//! background thread. The thread later completes a whole batch: it takes each finished
//! request's future out of `pending`, groups them by the loop they belong to, and hands each
//! loop its own group — through the loop's wake-up (`wake`: a queue and one byte on a socket
//! the loop watches, no GIL at all), or, for a loop that cannot watch one, with one
//! `call_soon_threadsafe` (one GIL acquisition per batch, nothing once the interpreter is
//! exiting: `runtime::attach`). One wake-up per loop involved, never per request. A future is
//! only ever resolved on its own loop's thread, so a store shared by several loops (threads
//! each running `asyncio.run`) wakes every one of them.
//!
//! Why not pyo3-async-runtimes' `future_into_py` (used for the one-off awaits in `runtime`):
//! measured in the same run (`benches/bench_awaits.py`, release build, 2 loaded cores), one
//! await of a result made on the tokio runtime costs 41.5 µs through this resolver against
//! 89.9 µs through `future_into_py` when awaits come one at a time (2.2x), and 1.7 µs against
//! 51.4 µs each when 100 wait together (30x: one wake-up for the batch instead of a bridge
//! round trip per future). Store commits and Redis publish confirms keep it.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;

use crate::python::futures::{settle_all, Finished, Outcome};
use crate::python::wake::{self, LoopWake};

/// A request's future, the address of its loop, and how the loop is woken.
struct Waiting {
    fut: Py<PyAny>,
    loop_id: usize,
    via: Via,
}

/// How a loop gets its finished futures.
enum Via {
    /// Its own wake-up (`wake`): no GIL on the finishing thread.
    Wake(Arc<LoopWake>),
    /// `call_soon_threadsafe` on the loop (held alive by the group while it is handed over).
    Loop(Py<PyAny>),
}

/// Pending futures of one store or transport.
#[derive(Default)]
pub struct Completions {
    /// token -> (future, its loop)
    pending: Mutex<HashMap<u64, Waiting>>,
    next: AtomicU64,
}

impl Completions {
    /// A new future on the running loop and the token that completes it.
    pub fn register<'py>(&self, py: Python<'py>) -> PyResult<(u64, Py<PyAny>, Bound<'py, PyAny>)> {
        let loop_ = Self::running_loop(py)?;
        let fut = loop_.call_method0(intern!(py, "create_future"))?;
        let token = self.next.fetch_add(1, Relaxed) + 1;
        let via = match wake::of(&loop_) {
            Some(w) => Via::Wake(w),
            None => Via::Loop(loop_.clone().unbind()),
        };
        let waiting = Waiting {
            fut: fut.clone().unbind(),
            loop_id: loop_.as_ptr() as usize,
            via,
        };
        self.pending.lock().insert(token, waiting);
        Ok((token, fut.unbind(), loop_))
    }

    /// Forgets a token whose request could not be sent.
    pub fn forget(&self, token: u64) {
        self.pending.lock().remove(&token);
    }

    /// Fails a registered future at once (on the loop thread).
    pub fn fail_now(&self, py: Python<'_>, token: u64, err: &PyErr) {
        let found = self.pending.lock().remove(&token);
        if let Some(Waiting { fut, .. }) = found {
            let _ = fut
                .bind(py)
                .call_method1(intern!(py, "set_exception"), (err.value(py),));
        }
    }

    /// Resolves a registered future at once (on the loop thread): a request answered without
    /// the writer thread (`Writer::log_now`).
    pub fn resolve_now(&self, py: Python<'_>, token: u64, value: &Bound<'_, PyAny>) {
        let found = self.pending.lock().remove(&token);
        if let Some(Waiting { fut, .. }) = found {
            crate::python::futures::resolve(py, &fut, value);
        }
    }

    /// Whether every one of `tokens` is pending on `loop_` (so can be resolved from its thread).
    pub fn all_on(&self, tokens: &[u64], loop_: &Bound<'_, PyAny>) -> bool {
        let id = loop_.as_ptr() as usize;
        let pending = self.pending.lock();
        tokens
            .iter()
            .all(|t| pending.get(t).is_some_and(|w| w.loop_id == id))
    }

    /// The running loop.
    pub fn running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        static GET_RUNNING_LOOP: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
        let get = GET_RUNNING_LOOP.get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("asyncio")?.getattr("get_running_loop")?.unbind())
        })?;
        get.bind(py).call0()
    }

    /// Called from any thread: hands each loop involved the outcomes of its own futures, with
    /// one wake-up per loop.
    pub fn complete(&self, resolver: &Py<PyResolver>, outcomes: Vec<(u64, Outcome)>) {
        // Grouped by loop (compared by address) under the lock, without touching Python.
        let mut woken: Vec<(Arc<LoopWake>, Finished)> = Vec::new();
        let mut called: Vec<(Py<PyAny>, Finished)> = Vec::new();
        {
            let mut pending = self.pending.lock();
            for (token, outcome) in outcomes {
                let Some(Waiting { fut, via, .. }) = pending.remove(&token) else {
                    continue; // token 0, or a request forgotten or failed already
                };
                match via {
                    Via::Wake(w) => group(&mut woken, w, (fut, outcome), Arc::ptr_eq),
                    Via::Loop(l) => group(&mut called, l, (fut, outcome), |a, b| {
                        a.as_ptr() == b.as_ptr()
                    }),
                }
            }
        }
        for (wake, items) in woken {
            wake.hand(items);
        }
        if called.is_empty() {
            return;
        }
        let _ = crate::python::runtime::attach(|py| {
            for (loop_, items) in called {
                let Ok(batch) = Py::new(py, PyBatch(Mutex::new(items))) else {
                    continue;
                };
                // A closed loop refuses; its futures are gone with it.
                let _ = loop_.bind(py).call_method1(
                    intern!(py, "call_soon_threadsafe"),
                    (resolver.bind(py), batch),
                );
            }
        });
    }
}

/// Adds `item` to the group of `key` (a new group when none matches).
fn group<K>(
    groups: &mut Vec<(K, Finished)>,
    key: K,
    item: (Py<PyAny>, Outcome),
    same: impl Fn(&K, &K) -> bool,
) {
    match groups.iter_mut().find(|(k, _)| same(k, &key)) {
        Some((_, items)) => items.push(item),
        None => groups.push((key, vec![item])),
    }
}

/// The finished futures of one loop and their outcomes, handed to that loop's thread.
#[pyclass(frozen, name = "CompletionBatch", module = "oxbus._oxbus")]
pub struct PyBatch(Mutex<Finished>);

/// Resolves a batch of finished requests; scheduled on their loop's thread by
/// `Completions::complete`. Kept over `future_into_py` for per-event results: 41.5 vs 89.9 µs
/// an await one at a time, 1.7 vs 51.4 µs with 100 waiting (`benches/bench_awaits.py`).
#[pyclass(frozen, name = "Resolver", module = "oxbus._oxbus")]
pub struct PyResolver;

impl PyResolver {
    /// One resolver serves every loop of its store or transport.
    pub fn new(_completions: Arc<Completions>) -> Self {
        Self
    }
}

#[pymethods]
impl PyResolver {
    #[allow(clippy::unused_self)] // a callable object: the loop calls it with the batch
    fn __call__(&self, py: Python<'_>, batch: &Bound<'_, PyBatch>) {
        settle_all(py, std::mem::take(&mut *batch.get().0.lock()));
    }
}

/// A benchmark hook (`benches/bench_awaits.py`): `n` awaitables of `1`, each resolved from the
/// shared tokio runtime, either with this module's batched resolver (`batched=True`: one task
/// completes all `n` with one `call_soon_threadsafe`, as a writer or transport batch does) or
/// with `runtime::future_into_py` (one bridge round trip each).
#[pyfunction]
pub fn await_probe(py: Python<'_>, batched: bool, n: usize) -> PyResult<Vec<Py<PyAny>>> {
    if !batched {
        return (0..n)
            .map(|_| Ok(crate::python::runtime::future_into_py(py, async { Ok(1) })?.unbind()))
            .collect();
    }
    let completions = Arc::new(Completions::default());
    let resolver = Py::new(py, PyResolver::new(Arc::clone(&completions)))?;
    let mut futures = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        let (token, fut, _) = completions.register(py)?;
        tokens.push(token);
        futures.push(fut);
    }
    crate::python::runtime::handle()?.spawn(async move {
        let outcomes = tokens
            .into_iter()
            .map(|t| {
                let f: Outcome = Box::new(|py| Ok(1i64.into_pyobject(py)?.into_any().unbind()));
                (t, f)
            })
            .collect();
        completions.complete(&resolver, outcomes);
    });
    Ok(futures)
}
