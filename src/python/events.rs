//! How a Python object is read as an event: its type key, class lineage, key and id, and how a
//! subscription target (class, string, Enum member) becomes a `Matcher`. Also the one place that
//! steps an awaitable with `PyIter_Send`.

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType};

use crate::core::routing::Matcher;
use crate::python::errors;

static ENUM: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn enum_value<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = obj.py();
    let enum_cls = ENUM.import(py, "enum", "Enum")?;
    if obj.is_instance(enum_cls.as_any())? {
        Ok(Some(obj.getattr(intern!(py, "value"))?))
    } else {
        Ok(None)
    }
}

/// The event's type key: `event_type` (a str, or an Enum whose value is used), a dict's
/// `"event_type"` item, else the class name.
pub fn type_key(event: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = event.py();
    let raw = if let Ok(d) = event.cast::<PyDict>() {
        d.get_item(intern!(py, "event_type"))?
    } else {
        event.getattr_opt(intern!(py, "event_type"))?
    };
    if let Some(raw) = raw {
        let raw = enum_value(&raw)?.unwrap_or(raw);
        if let Ok(s) = raw.cast::<PyString>() {
            return text_of(s, "event_type");
        }
        if !raw.is_none() {
            return text_of(&raw.str()?, "event_type");
        }
    }
    text_of(&event.get_type().name()?, "the class name")
}

/// A type key as UTF-8; a str that has none (a lone surrogate) is refused, naming it.
fn text_of(s: &Bound<'_, PyString>, what: &str) -> PyResult<String> {
    match s.to_str() {
        Ok(t) => Ok(t.to_owned()),
        Err(e) => Err(chained(
            errors::invalid_event(format!(
                "{what} {} is not valid UTF-8 text (a lone surrogate?): type keys are \
                 written to logs and brokers as UTF-8",
                describe(s.as_any())
            )),
            s.py(),
            e,
        )),
    }
}

/// `err` with `cause` as its `__cause__`.
fn chained(err: PyErr, py: Python<'_>, cause: PyErr) -> PyErr {
    err.set_cause(py, Some(cause));
    err
}

/// Ids of the event's class and its bases, most derived first.
pub fn mro_ids(ty: &Bound<'_, PyType>) -> PyResult<Vec<usize>> {
    let mro = ty.getattr(intern!(ty.py(), "__mro__"))?;
    let mro = mro.cast::<PyTuple>()?;
    Ok(mro.iter().map(|t| t.as_ptr() as usize).collect())
}

/// How an event class's `aggregate_id` is read (decided once per class: `key_read`).
pub enum KeyRead {
    /// The class has none: the instance's `__dict__` may (a dataclass field, say).
    Instance,
    /// The attribute, as Python reads it.
    Attribute,
    /// A property whose getter is `return self.<name>`: `<name>` is read instead, without the
    /// getter's Python frame, while the class still has that very `descriptor`.
    Via {
        descriptor: Py<PyAny>,
        name: Py<PyString>,
    },
    /// `DomainEvent`'s default (None unless set on the instance): the instance's `__dict__`,
    /// while the class still has that `descriptor`.
    Default { descriptor: Py<PyAny> },
}

impl KeyRead {
    pub fn clone_ref(&self, py: Python<'_>) -> Self {
        match self {
            Self::Instance => Self::Instance,
            Self::Attribute => Self::Attribute,
            Self::Via { descriptor, name } => Self::Via {
                descriptor: descriptor.clone_ref(py),
                name: name.clone_ref(py),
            },
            Self::Default { descriptor } => Self::Default {
                descriptor: descriptor.clone_ref(py),
            },
        }
    }
}

static KEY_READER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// How instances of `ty` give their `aggregate_id` (see `oxbus._keys`).
pub fn key_read(ty: &Bound<'_, PyType>) -> PyResult<KeyRead> {
    let py = ty.py();
    if !ty.hasattr(intern!(py, "aggregate_id"))? {
        return Ok(KeyRead::Instance);
    }
    if cfg!(feature = "abi3") {
        return Ok(KeyRead::Attribute); // no `_PyType_Lookup` to check the class with
    }
    let reader = KEY_READER.import(py, "oxbus._keys", "key_reader")?;
    let found = reader.call1((ty,))?;
    if found.is_none() {
        return Ok(KeyRead::Attribute);
    }
    let (kind, descriptor, name): (String, Py<PyAny>, Option<Py<PyString>>) = found.extract()?;
    Ok(match (kind.as_str(), name) {
        ("attr", Some(name)) => KeyRead::Via { descriptor, name },
        ("default", _) => KeyRead::Default { descriptor },
        _ => KeyRead::Attribute,
    })
}

#[cfg(not(feature = "abi3"))]
extern "C" {
    /// The attribute `name` as found on the type and its bases (borrowed, no error set),
    /// through the type attribute cache. In CPython's C API since 2.x (`cpython/object.h`);
    /// PyO3's bindings leave it out as private.
    fn _PyType_Lookup(ty: *mut ffi::PyTypeObject, name: *mut ffi::PyObject) -> *mut ffi::PyObject;
}

/// Whether the class of `event` still has `descriptor` as its `aggregate_id`.
#[cfg(not(feature = "abi3"))]
fn class_still_has(event: &Bound<'_, PyAny>, descriptor: &Py<PyAny>) -> bool {
    let name = intern!(event.py(), "aggregate_id");
    // SAFETY: the GIL is held; both are live objects; the result is borrowed and only compared.
    let found = unsafe { _PyType_Lookup(ffi::Py_TYPE(event.as_ptr()), name.as_ptr()) };
    found == descriptor.as_ptr()
}

#[cfg(feature = "abi3")]
fn class_still_has(_event: &Bound<'_, PyAny>, _descriptor: &Py<PyAny>) -> bool {
    false
}

#[cfg(not(feature = "abi3"))]
extern "C" {
    /// Where the instance's `__dict__` is (made first when its attributes live in the object:
    /// as reading `__dict__` does), or NULL when it has none (no error set). In CPython's C
    /// API (`cpython/object.h`, 3.10-3.13); PyO3's bindings leave it out as private.
    fn _PyObject_GetDictPtr(obj: *mut ffi::PyObject) -> *mut *mut ffi::PyObject;
}

/// The instance's own `aggregate_id` (its `__dict__`'s): the dictionary read in place, not
/// through the `__dict__` attribute (a descriptor call and a new reference: two thirds of a
/// keyed event's key read).
#[cfg(not(feature = "abi3"))]
fn instance_key<'py>(event: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = event.py();
    // SAFETY: the GIL is held and `event` is live; the slot it returns (if any) is the
    // object's own and holds a dict or NULL, borrowed while `event` lives and nothing runs.
    let dict = unsafe {
        let slot = _PyObject_GetDictPtr(event.as_ptr());
        if slot.is_null() || (*slot).is_null() {
            return Ok(None);
        }
        Bound::from_borrowed_ptr(py, *slot)
    };
    match dict.cast::<PyDict>() {
        Ok(d) => d.get_item(intern!(py, "aggregate_id")),
        Err(_) => Ok(None),
    }
}

/// The instance's own `aggregate_id` (its `__dict__`'s).
#[cfg(feature = "abi3")]
fn instance_key<'py>(event: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = event.py();
    match event.getattr_opt(intern!(py, "__dict__"))? {
        Some(d) => match d.cast::<PyDict>() {
            Ok(d) => d.get_item(intern!(py, "aggregate_id")),
            Err(_) => Ok(None),
        },
        None => Ok(None),
    }
}

/// The event's ordering key: a dict's `"aggregate_id"` item, or the `aggregate_id` attribute
/// (read as `read` says: on the class when it defines one, else in the instance's `__dict__`,
/// so events without one never pay for an `AttributeError`). `None` when absent or `None`.
pub fn aggregate_key<'py>(
    event: &Bound<'py, PyAny>,
    read: &KeyRead,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = event.py();
    let found = if let Ok(d) = event.cast::<PyDict>() {
        d.get_item(intern!(py, "aggregate_id"))?
    } else {
        let attribute = match read {
            KeyRead::Instance => None,
            KeyRead::Via { descriptor, name } if class_still_has(event, descriptor) => {
                Some(event.getattr(name.bind(py)))
            }
            KeyRead::Default { descriptor } if class_still_has(event, descriptor) => None,
            KeyRead::Attribute | KeyRead::Via { .. } | KeyRead::Default { .. } => {
                Some(event.getattr(intern!(py, "aggregate_id")))
            }
        };
        match attribute {
            None => instance_key(event)?,
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => {
                let msg = format!(
                    "reading aggregate_id of a {} event raised {}: {}",
                    type_name(event),
                    e.get_type(py).name()?,
                    e.value(py)
                );
                return Err(chained(errors::invalid_event(msg), py, e));
            }
        }
    };
    Ok(found.filter(|k| !k.is_none()))
}

/// The key an event is published with: `explicit` (unless None), else its `aggregate_id`.
pub fn event_key<'py>(
    event: &Bound<'py, PyAny>,
    explicit: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    match explicit {
        Some(k) if !k.is_none() => Ok(Some(k.clone())),
        _ => {
            let ty = event.get_type();
            let read = if ty.hasattr(intern!(ty.py(), "aggregate_id"))? {
                KeyRead::Attribute
            } else {
                KeyRead::Instance
            };
            aggregate_key(event, &read)
        }
    }
}

/// The lane of a key: the Python hash of its canonical form (see `canonical_key`). Different
/// keys with equal hashes share a lane, which only costs parallelism, never order.
pub fn lane_of(key: &Bound<'_, PyAny>) -> PyResult<u64> {
    match canonical_key(key)?.hash() {
        #[allow(clippy::cast_sign_loss)]
        Ok(h) => Ok(h as u64),
        Err(_) => Err(unhashable_key(key)),
    }
}

fn unhashable_key(key: &Bound<'_, PyAny>) -> PyErr {
    errors::invalid_event(format!(
        "the event key {} (type {}) is unhashable; keys order events per aggregate and must be hashable",
        describe(key),
        type_name(key),
    ))
}

fn describe(v: &Bound<'_, PyAny>) -> String {
    let r = v.repr().map_or_else(|_| "?".to_owned(), |r| r.to_string());
    if r.chars().count() > 80 {
        format!("{}...", r.chars().take(77).collect::<String>())
    } else {
        r
    }
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

static UUID: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// The one form of an ordering key, on every backend: an Enum member is its value, a UUID its
/// text, a list or tuple a tuple of canonical parts; str, int, float and any other hashable
/// object stay as they are. A key read back from the log or a broker (JSON gives lists and
/// text) is thereby the same key, in the same lane, as the one published.
pub fn canonical_key<'py>(key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if key.is_exact_instance_of::<PyString>() || key.is_exact_instance_of::<PyInt>() {
        return Ok(key.clone());
    }
    let py = key.py();
    if let Some(v) = enum_value(key)? {
        return canonical_key(&v);
    }
    if key.is_instance(UUID.import(py, "uuid", "UUID")?.as_any())? {
        return Ok(key.str()?.into_any());
    }
    let parts = if let Ok(t) = key.cast::<PyTuple>() {
        t.iter().collect::<Vec<_>>()
    } else if let Ok(l) = key.cast::<PyList>() {
        l.iter().collect::<Vec<_>>()
    } else {
        return Ok(key.clone());
    };
    let parts = parts
        .iter()
        .map(canonical_key)
        .collect::<PyResult<Vec<_>>>()?;
    Ok(PyTuple::new(py, parts)?.into_any())
}

/// The canonical key of an event that is written somewhere (the durable log, a broker) and
/// read back as JSON: only str, int, finite float, bool (and Enum members, UUIDs, lists and
/// tuples of these, in their canonical form) come back as the same key. Anything else is
/// refused here, before a byte is written, naming the key.
pub fn portable_key<'py>(key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let canonical = canonical_key(key)?;
    if !is_portable(&canonical) {
        return Err(errors::invalid_event(format!(
            "the event key {} (type {}) cannot be written: a durable or broker bus reads keys \
             back from JSON, so a key must be a str, int, float, bool, UUID, Enum member, or a \
             tuple of these; pass key=str(...) or make aggregate_id one of them",
            describe(key),
            type_name(key),
        )));
    }
    canonical.hash().map_err(|_| unhashable_key(key))?;
    Ok(canonical)
}

fn is_portable(key: &Bound<'_, PyAny>) -> bool {
    if key.is_instance_of::<PyString>() || key.is_instance_of::<PyInt>() {
        return true; // bool is an int
    }
    if let Ok(f) = key.cast::<PyFloat>() {
        return f.value().is_finite();
    }
    key.cast::<PyTuple>()
        .is_ok_and(|t| t.iter().all(|p| is_portable(&p)))
}

/// A subscription target as a matcher: a class (by identity; subclasses match), a string
/// (exact, or a topic pattern with `*` / `#`), or an Enum member (its string value).
pub fn matcher_for(target: &Bound<'_, PyAny>) -> PyResult<Matcher> {
    if let Ok(ty) = target.cast::<PyType>() {
        return Ok(Matcher::Class(ty.as_ptr() as usize));
    }
    let value = enum_value(target)?;
    let s = value.as_ref().unwrap_or(target);
    if let Ok(s) = s.cast::<PyString>() {
        let Ok(text) = s.to_str() else {
            return Err(errors::invalid_subscription(format!(
                "cannot subscribe to {}: it is not valid UTF-8 text (a lone surrogate?)",
                describe(s.as_any())
            )));
        };
        return Matcher::for_str(text).map_err(|e| errors::to_py(&e));
    }
    Err(errors::invalid_subscription(format!(
        "cannot subscribe to {} (type {}): give an event class, a type string, a pattern such as \"order.*\", or an Enum member with a string value",
        target.repr()?,
        target.get_type().name()?
    )))
}

/// What one step of an awaitable gave.
pub enum Step<'py> {
    /// It yielded this (a future to wait on, or None for a bare yield).
    Yielded(Bound<'py, PyAny>),
    /// It finished with this value.
    Returned(Bound<'py, PyAny>),
}

/// Sends `None` into an iterator-like awaitable (a coroutine, or the iterator of `__await__`).
pub fn send_none<'py>(it: &Bound<'py, PyAny>) -> PyResult<Step<'py>> {
    send(it, None)
}

/// Sends `value` (`None` when absent) into an iterator-like awaitable.
pub fn send<'py>(it: &Bound<'py, PyAny>, value: Option<&Bound<'_, PyAny>>) -> PyResult<Step<'py>> {
    let py = it.py();
    let mut out: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: None is immortal enough to borrow; `value` outlives the call.
    let arg = value.map_or_else(|| unsafe { ffi::Py_None() }, Bound::as_ptr);
    // SAFETY: `it` and `arg` are live objects while the GIL is held (`PyIter_Send` borrows
    // `arg`); `out` receives a new reference (or NULL with an exception set), which we take
    // ownership of right away.
    let status = unsafe { ffi::PyIter_Send(it.as_ptr(), arg, &raw mut out) };
    match status {
        ffi::PySendResult::PYGEN_NEXT => {
            // SAFETY: PYGEN_NEXT returns a new, non-null reference.
            Ok(Step::Yielded(unsafe { Bound::from_owned_ptr(py, out) }))
        }
        ffi::PySendResult::PYGEN_RETURN => {
            // SAFETY: PYGEN_RETURN returns a new, non-null reference.
            Ok(Step::Returned(unsafe { Bound::from_owned_ptr(py, out) }))
        }
        ffi::PySendResult::PYGEN_ERROR => Err(PyErr::fetch(py)),
    }
}

/// The exception `coroutine.throw(typ, val)` throws: `val` when given, else `typ` (a class is
/// instantiated, an instance used as is).
pub fn thrown(typ: &Bound<'_, PyAny>, val: Option<&Bound<'_, PyAny>>) -> PyErr {
    match val {
        Some(v) if !v.is_none() => PyErr::from_value(v.clone()),
        _ => PyErr::from_value(typ.clone()),
    }
}

/// Throws an exception into an awaitable's iterator.
pub fn throw_into<'py>(it: &Bound<'py, PyAny>, err: &PyErr) -> PyResult<Step<'py>> {
    let py = it.py();
    match it.call_method1(intern!(py, "throw"), (err.value(py),)) {
        Ok(v) => Ok(Step::Yielded(v)),
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) => {
            Ok(Step::Returned(e.value(py).getattr(intern!(py, "value"))?))
        }
        Err(e) => Err(e),
    }
}

/// Exactly a native coroutine (`async def`'s result).
#[cfg(not(feature = "abi3"))]
fn is_coroutine(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: a type check on a live object.
    unsafe { ffi::PyCoro_CheckExact(obj.as_ptr()) != 0 }
}

/// Exactly a native coroutine: the stable ABI has no `PyCoro_Type`, so against
/// `types.CoroutineType`.
#[cfg(feature = "abi3")]
fn is_coroutine(obj: &Bound<'_, PyAny>) -> bool {
    static CORO: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    CORO.import(obj.py(), "types", "CoroutineType")
        .is_ok_and(|t| obj.get_type().is(t))
}

/// The iterator that drives `obj` when it is awaitable: a coroutine itself, or
/// `obj.__await__()`. `None` for a plain value (a sync handler's result).
pub fn awaitable_iter<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    if is_coroutine(obj) {
        return Ok(Some(obj.clone()));
    }
    if obj.is_none() {
        return Ok(None);
    }
    let py = obj.py();
    match obj.getattr_opt(intern!(py, "__await__"))? {
        Some(m) => {
            let it = m.call0()?;
            Ok(Some(it))
        }
        None => Ok(None),
    }
}

/// A clear error for a handler argument that cannot be called.
pub fn check_callable(handler: &Bound<'_, PyAny>) -> PyResult<()> {
    if handler.is_callable() {
        Ok(())
    } else {
        Err(errors::invalid_subscription(format!(
            "handler must be callable, got {} (type {})",
            handler.repr()?,
            handler.get_type().name()?
        )))
    }
}

/// The `TypeError` raised for `publish(None)`.
pub fn none_event_error() -> PyErr {
    errors::invalid_event(
        "cannot publish None: an event must be an object (a DomainEvent, a dataclass, a dict, ...)",
    )
}
