//! What is being handled: the envelope around an event, and the context variable that carries
//! it into handlers (and into tasks they spawn, which copy the context).
//!
//! Ids are computed lazily: an envelope that nobody asks about costs one allocation.

use std::ffi::CStr;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::atomic::{
    AtomicPtr, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::sync::Arc;

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString};

use crate::core::cache;
use crate::python::context;
use crate::python::events;
use crate::python::route::Route;
use crate::transport::HandlerFailure;

/// A new random event id (UUID4, as a string).
#[pyfunction]
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Where an event's correlation comes from.
pub enum Origin {
    /// A root event; `publish(correlation_id=...)` may have named one.
    Root(Option<Py<PyAny>>),
    /// Published while a handler ran: (correlation id, causation id) of the handled event.
    Child(Py<PyAny>, Py<PyAny>),
}

/// What travels with an event through the queue: the event, where it came from, its route,
/// and which call is running. Plain Rust behind an `Arc`: the Python `Envelope` is made only
/// when someone asks (`current_envelope()`, the after-call hook).
/// Settles a delivered event with its transport, once every subscription finished it (a
/// Redis entry's `XACK`), with the dead letters of the subscriptions that gave up on it.
pub trait Settle: Send + Sync {
    /// A subscription gave up: its dead letter goes to the broker with the settlement.
    fn dead_letter(&self, failure: HandlerFailure);
    /// Every subscription finished (called once).
    fn finish(self: Box<Self>);
}

/// See [`Settle`].
pub type Ack = Box<dyn Settle>;

/// A subscription's dead letter as the after-call hook gives it (a dict), for the broker.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct DeadLetterFields {
    id: String,
    subscription: String,
    error_type: String,
    error_message: String,
    traceback: String,
    attempts: u32,
    first_failed_at: String,
    last_failed_at: String,
}

// The `Arc` (two counts and this) must fit the allocator's fast bins: one is made per event.
const _: () = assert!(std::mem::size_of::<EnvData>() <= 104);

pub struct EnvData {
    /// The event's position in the durable log, when the bus has one.
    pub position: Option<i64>,
    /// What to do once every subscription finished the event (remote deliveries): a
    /// `Box<Ack>` made by `Box::into_raw`, or null. A pointer rather than a locked `Option`:
    /// the common case (nothing to do) reads one word, with no atomic read-modify-write.
    ack: AtomicPtr<Ack>,
    event: Py<PyAny>,
    origin: Origin,
    key: Option<Py<PyAny>>,
    route: Arc<Route>,
    event_id: PyOnceLock<Py<PyAny>>,
    /// The running call: subscription index (high half) and attempt (low half), in one word
    /// so that the whole `Arc` stays within the allocator's fast bins (120 bytes).
    call: AtomicU64,
}

impl Drop for EnvData {
    fn drop(&mut self) {
        let ack = *self.ack.get_mut();
        if !ack.is_null() {
            // SAFETY: made by `Box::into_raw` in `set_ack` and never run: ours to free.
            drop(unsafe { Box::from_raw(ack) });
        }
    }
}

impl EnvData {
    pub fn new(
        event: Py<PyAny>,
        origin: Origin,
        key: Option<Py<PyAny>>,
        route: Arc<Route>,
        position: Option<i64>,
    ) -> Self {
        Self {
            position,
            ack: AtomicPtr::new(std::ptr::null_mut()),
            event,
            origin,
            key,
            route,
            event_id: PyOnceLock::new(),
            call: AtomicU64::new(1),
        }
    }

    /// The index of the subscription running now.
    #[allow(clippy::cast_possible_truncation)] // stored from a usize below
    fn sub_index(&self) -> usize {
        (self.call.load(Relaxed) >> 32) as usize
    }

    /// 1 for the first call of a handler, 2 for its first retry, ...
    #[allow(clippy::cast_possible_truncation)] // the low half
    pub fn attempt(&self) -> u32 {
        self.call.load(Relaxed) as u32
    }

    /// Records which subscription and attempt is running now.
    pub fn set_call(&self, sub_index: usize, attempt: u32) {
        self.call
            .store(((sub_index as u64) << 32) | u64::from(attempt), Relaxed);
    }

    pub fn event_ref(&self) -> &Py<PyAny> {
        &self.event
    }

    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    /// The event's id: its `event_id` (attribute or dict item), else a UUID made once.
    pub fn id<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.event_id
            .get_or_try_init(py, || {
                let ev = self.event.bind(py);
                let found = if let Ok(d) = ev.cast::<PyDict>() {
                    d.get_item(intern!(py, "event_id"))?
                } else {
                    ev.getattr_opt(intern!(py, "event_id"))?
                };
                Ok::<_, PyErr>(match found.filter(|v| !v.is_none()) {
                    Some(v) => v.unbind(),
                    None => PyString::new(py, &new_event_id()).into_any().unbind(),
                })
            })
            .map(|v| v.bind(py).clone())
    }

    /// The correlation id: named at publish, inherited from the handler that published, the
    /// event's own non-None `correlation_id`, else the event id.
    pub fn correlation<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.origin {
            Origin::Root(Some(c)) | Origin::Child(c, _) => Ok(c.bind(py).clone()),
            Origin::Root(None) => {
                let ev = self.event.bind(py);
                if ev.cast::<PyDict>().is_err() {
                    if let Some(c) = ev.getattr_opt(intern!(py, "correlation_id"))? {
                        if !c.is_none() {
                            return Ok(c);
                        }
                    }
                }
                self.id(py)
            }
        }
    }

    /// The causation id: the id of the event whose handler published this one, else None.
    pub fn causation<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        match &self.origin {
            Origin::Child(_, c) => Some(c.bind(py).clone()),
            Origin::Root(_) => None,
        }
    }

    /// The ordering key: the one given at publish, else the event's `aggregate_id`.
    pub fn key<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        if let Some(k) = &self.key {
            return Ok(Some(k.bind(py).clone()));
        }
        events::aggregate_key(self.event.bind(py), &self.route.key_read)
    }

    /// Sets what to run once every subscription finished the event (before it is shared).
    pub fn set_ack(&mut self, ack: Ack) {
        let old = std::mem::replace(self.ack.get_mut(), Box::into_raw(Box::new(ack)));
        if !old.is_null() {
            // SAFETY: a pointer made by `Box::into_raw` above, owned by this envelope.
            drop(unsafe { Box::from_raw(old) });
        }
    }

    /// Runs the acknowledgement, if any (once).
    pub fn acknowledge(&self) {
        if self.ack.load(Acquire).is_null() {
            return;
        }
        let ack = self.ack.swap(std::ptr::null_mut(), AcqRel);
        if !ack.is_null() {
            // SAFETY: made by `Box::into_raw` in `set_ack`; the swap hands it out once.
            let ack = unsafe { Box::from_raw(ack) };
            ack.finish();
        }
    }

    /// Hands a subscription's dead letter to the acknowledgement, if the event has one (a
    /// broker delivery): written to the broker before the message is acknowledged. Whether
    /// it had one.
    pub fn dead_letter(&self, failure: HandlerFailure) -> bool {
        let ack = self.ack.load(Acquire);
        if ack.is_null() {
            return false;
        }
        // SAFETY: made by `Box::into_raw` in `set_ack`; only `acknowledge` and `drop` free it.
        // Both run on the loop thread under the GIL, as this does (the after-call hook), so
        // neither runs meanwhile, and `&self` keeps the envelope alive.
        unsafe { (*ack).dead_letter(failure) };
        true
    }

    /// Whether a running handler published it.
    pub fn is_child(&self) -> bool {
        matches!(self.origin, Origin::Child(..))
    }

    /// The name of the subscription running now.
    pub fn subscription(&self) -> Option<Arc<str>> {
        self.route
            .subs
            .get(self.sub_index())
            .map(|s| s.name.clone())
    }
}

/// The event being handled and where it came from. `oxbus.current_envelope()` returns it inside
/// a handler.
#[pyclass(frozen, name = "Envelope", module = "oxbus._oxbus")]
pub struct PyEnvelope {
    data: Arc<EnvData>,
}

impl PyEnvelope {
    pub fn new(data: Arc<EnvData>) -> Self {
        Self { data }
    }
}

#[pymethods]
impl PyEnvelope {
    /// The event object, exactly as published.
    #[getter]
    fn event(&self, py: Python<'_>) -> Py<PyAny> {
        self.data.event.clone_ref(py)
    }

    /// The event's id (see `oxbus.DomainEvent.event_id`).
    #[getter]
    fn event_id<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.data.id(py)
    }

    /// The id shared by every event of one causal chain.
    #[getter]
    fn correlation_id<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.data.correlation(py)
    }

    /// The id of the event whose handler published this one (None for a root event).
    #[getter]
    fn causation_id<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.data.causation(py)
    }

    /// The ordering key: `publish(key=...)`, else the event's `aggregate_id`, else None.
    #[getter]
    fn key<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.data.key(py)
    }

    /// 1 for the first call of a handler, 2 for its first retry, ...
    #[getter]
    fn attempt(&self) -> u32 {
        self.data.attempt()
    }

    /// The name of the subscription being run.
    #[getter]
    fn subscription(&self) -> Option<String> {
        self.data.subscription().map(|s| s.to_string())
    }

    /// The event's position in the durable log (None on an in-memory bus).
    #[getter]
    fn position(&self) -> Option<i64> {
        self.data.position
    }

    /// The event's type key.
    #[getter]
    fn event_type(&self) -> &str {
        &self.data.route.type_key
    }

    /// An event delivered by a broker: `fields` (id, subscription, error_type, error_message,
    /// traceback, attempts, first_failed_at, last_failed_at) become a dead letter on the
    /// broker, written before the message is acknowledged. False for an event of this process.
    fn _dead_letter(&self, fields: DeadLetterFields) -> bool {
        self.data.dead_letter(HandlerFailure {
            id: fields.id,
            subscription: fields.subscription,
            error_type: fields.error_type,
            error_message: fields.error_message,
            traceback: fields.traceback,
            attempts: fields.attempts,
            first_failed_at: fields.first_failed_at,
            last_failed_at: fields.last_failed_at,
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let d = &self.data;
        Ok(format!(
            "Envelope(event_type={:?}, event_id={}, correlation_id={}, causation_id={}, subscription={:?}, attempt={})",
            d.route.type_key,
            d.id(py)?.repr()?,
            d.correlation(py)?.repr()?,
            d.causation(py).map_or_else(|| Ok("None".to_owned()), |c| c.repr().map(|r| r.to_string()))?,
            d.subscription(),
            self.attempt()
        ))
    }
}

static CURRENT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The context variable holding the envelope being handled.
pub fn current_var(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    CURRENT
        .get_or_try_init(py, || {
            let cv = py.import("contextvars")?.getattr("ContextVar")?;
            Ok::<_, PyErr>(cv.call1(("oxbus_envelope",))?.unbind())
        })
        .map(|v| v.bind(py))
}

const CAPSULE_NAME: &CStr = c"oxbus.envelope";

unsafe extern "C" fn drop_capsule(capsule: *mut ffi::PyObject) {
    // SAFETY: called once by CPython when the capsule dies; the pointer came from
    // `Arc::into_raw` in `set_current` under the same name.
    unsafe {
        let ptr = ffi::PyCapsule_GetPointer(capsule, CAPSULE_NAME.as_ptr());
        if !ptr.is_null() {
            drop(Arc::from_raw(ptr.cast::<EnvData>()));
        }
    }
}

/// The capsule a worker last put in the envelope's context variable, and the `Arc<EnvData>`
/// pointer it holds (so that replacing it needs no name check).
pub struct Slot {
    capsule: Py<PyAny>,
    /// From `Arc::into_raw`, owned by the capsule.
    raw: usize,
}

/// Hints the envelope's memory (see `core::cache`): the `Arc`'s counts and the data.
#[inline]
pub fn prefetch(env: &Arc<EnvData>) {
    let data = Arc::as_ptr(env).cast::<u8>();
    cache::prefetch(data.wrapping_sub(16), 16 + size_of::<EnvData>());
}

/// The current event's envelope as its worker holds it: the reference the worker's capsule
/// owns (see `set_current`), used without a count of its own. An event then costs no atomic
/// increment and decrement for the capsule (perf of the in-memory bus: the capsule's
/// `Arc::clone` was ~4% of the samples, its `lock incq` waiting on the stores before it).
/// Dropping it does nothing: the capsule releases the reference.
pub struct Borrowed(ManuallyDrop<Arc<EnvData>>);

impl Borrowed {
    /// # Safety
    /// `raw` comes from `Arc::into_raw` and is owned by a capsule that outlives this value
    /// and keeps that pointer while it lives: the worker's `Slot`, which only `set_current`
    /// changes, and the worker calls it only when its previous `Borrowed` is gone.
    unsafe fn new(raw: *const EnvData) -> Self {
        // SAFETY: see above; `ManuallyDrop` keeps the count untouched on drop.
        Self(ManuallyDrop::new(unsafe { Arc::from_raw(raw) }))
    }
}

impl Deref for Borrowed {
    type Target = Arc<EnvData>;

    fn deref(&self) -> &Arc<EnvData> {
        &self.0
    }
}

/// Sets the envelope of the event being handled in the running context (the worker task's).
/// The value is a capsule holding an `Arc`: not tracked by the cycle collector, so a busy bus
/// does not feed the GC one object per event. `slot` is the capsule this worker set last (the
/// worker keeps it): when it is still the running context's value and seen by that context
/// alone (no copy of the context shares it: see `context::value_is_private`), its pointer is
/// replaced in place, for a fraction of the cost of setting the variable. `ctx` is the context
/// the worker's task runs in, when the bus gave it one: then the check needs no copy of the
/// running context (`context::value_is_private_in`).
///
/// `env` moves into the capsule; the worker uses it through the returned `Borrowed`, which it
/// must drop before it calls this again (the capsule's old pointer is released here).
pub fn set_current(
    py: Python<'_>,
    env: Arc<EnvData>,
    slot: &mut Option<Slot>,
    ctx: Option<&Bound<'_, PyAny>>,
) -> PyResult<Borrowed> {
    if let Some(s) = slot.as_mut() {
        let capsule = s.capsule.bind(py);
        let private = match ctx {
            // The worker's task runs in `ctx`: checked without a copy of the context.
            Some(ctx) => match get_var(current_var(py)?)? {
                Some(got) => context::value_is_private_in(py, ctx, &got, capsule, 1),
                None => false,
            },
            None => context::value_is_private(py, capsule, 1)?,
        };
        if private {
            let raw = Arc::into_raw(env);
            // SAFETY: a capsule made below, holding `s.raw` (an `Arc<EnvData>` made by
            // `Arc::into_raw`), given another such pointer (never NULL, so the call cannot
            // fail); the old reference is released once it is out of the capsule (the
            // worker's `Borrowed` of it is gone: see above).
            unsafe {
                ffi::PyCapsule_SetPointer(s.capsule.as_ptr(), raw.cast_mut().cast());
                drop(Arc::from_raw(s.raw as *const EnvData));
            }
            s.raw = raw as usize;
            // SAFETY: owned by the slot's capsule until the next call.
            return Ok(unsafe { Borrowed::new(raw) });
        }
    }
    let var = current_var(py)?;
    let raw = Arc::into_raw(env);
    // SAFETY: `raw` is a valid pointer owned by the capsule from here on; `drop_capsule`
    // releases it exactly once.
    let capsule = unsafe {
        ffi::PyCapsule_New(
            raw.cast_mut().cast(),
            CAPSULE_NAME.as_ptr(),
            Some(drop_capsule),
        )
    };
    if capsule.is_null() {
        // SAFETY: the capsule was not created, so the reference is still ours to release.
        drop(unsafe { Arc::from_raw(raw) });
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `capsule` is a new reference we own; the var keeps its own reference.
    let capsule = unsafe { Bound::from_owned_ptr(py, capsule) };
    // The slot takes the capsule before anything can fail: it owns the reference from here.
    *slot = Some(Slot {
        capsule: capsule.clone().unbind(),
        raw: raw as usize,
    });
    set_var(var, &capsule)?;
    // SAFETY: owned by the slot's capsule until the next call.
    Ok(unsafe { Borrowed::new(raw) })
}

/// `var.set(value)`, the token dropped (we never reset: the next event overwrites).
#[cfg(not(feature = "abi3"))]
fn set_var(var: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
    // SAFETY: both pointers are live objects while the GIL is held; the returned token is a
    // new reference that we release at once.
    let token = unsafe { ffi::PyContextVar_Set(var.as_ptr(), value.as_ptr()) };
    if token.is_null() {
        return Err(PyErr::fetch(var.py()));
    }
    // SAFETY: `token` is a new, non-null reference we own.
    unsafe { ffi::Py_DECREF(token) };
    Ok(())
}

/// `var.set(value)`: the stable ABI has no `PyContextVar_*`, so through the method.
#[cfg(feature = "abi3")]
fn set_var(var: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
    var.call_method1(intern!(var.py(), "set"), (value,))
        .map(drop)
}

/// `var.get(None)`, or None when unset.
#[cfg(not(feature = "abi3"))]
fn get_var<'py>(var: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = var.py();
    let mut out: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: `var` is a live ContextVar; `out` receives a new reference or NULL.
    let rc = unsafe { ffi::PyContextVar_Get(var.as_ptr(), std::ptr::null_mut(), &raw mut out) };
    if rc < 0 {
        return Err(PyErr::fetch(py));
    }
    if out.is_null() {
        return Ok(None);
    }
    // SAFETY: a new, non-null reference we own.
    Ok(Some(unsafe { Bound::from_owned_ptr(py, out) }))
}

/// `var.get(None)`, or None when unset: through the method (see `set_var`).
#[cfg(feature = "abi3")]
fn get_var<'py>(var: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = var.py();
    let out = var.call_method1(intern!(py, "get"), (py.None(),))?;
    Ok((!out.is_none()).then_some(out))
}

/// The envelope data set in the running context, if any.
pub fn get_current(py: Python<'_>) -> PyResult<Option<Arc<EnvData>>> {
    let Some(obj) = get_var(current_var(py)?)? else {
        return Ok(None);
    };
    // SAFETY: only `set_current` puts values in this var, all capsules named CAPSULE_NAME
    // holding an `Arc<EnvData>`; we add a reference for the caller while the capsule lives.
    let ptr = unsafe { ffi::PyCapsule_GetPointer(obj.as_ptr(), CAPSULE_NAME.as_ptr()) };
    if ptr.is_null() {
        return Err(PyErr::fetch(py));
    }
    let ptr = ptr.cast::<EnvData>().cast_const();
    // SAFETY: see above; the capsule holds one strong count, we take another.
    unsafe { Arc::increment_strong_count(ptr) };
    // SAFETY: the count was just incremented for this new `Arc`.
    Ok(Some(unsafe { Arc::from_raw(ptr) }))
}

/// The envelope of the event being handled, or None outside a handler.
#[pyfunction]
pub fn current_envelope(py: Python<'_>) -> PyResult<Option<PyEnvelope>> {
    Ok(get_current(py)?.map(PyEnvelope::new))
}
