//! How instances of a class other than the exact built-ins are encoded: a [`Kind`] computed
//! once per class and cached (Enum, subclasses of the built-ins, sets, `datetime`/`date`/
//! `time`, `UUID`, `Decimal`, dataclasses, pydantic v2 models, plain objects with a
//! `__dict__`).

use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;
use pyo3::exceptions::PyBaseException;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple, PyType};
use rustc_hash::FxHashMap;

/// `Py_TPFLAGS_HEAPTYPE`: the class was made by a class statement (or `type(...)`).
pub(super) const HEAPTYPE: u64 = 1 << 9;

/// Classes whose [`Kind`] is cached at most; further classes are classified on each use.
pub(super) const KINDS_CAP: usize = 4096;

/// How instances of a class (other than the exact built-ins) are encoded; computed once per
/// class by [`classify`].
pub(super) enum Kind {
    Enum,
    Int,
    Float,
    Str,
    Dict,
    List,
    Tuple,
    Set,
    DateTime,
    Uuid,
    Decimal,
    /// Public dataclass fields, in order.
    Dataclass(Vec<Py<PyString>>),
    Pydantic,
    /// Public `__dict__` entries (less a `DomainEvent`'s identity and cached defaults).
    Object {
        domain_event: bool,
    },
    Unsupported,
}

/// A cached [`Kind`]; holding the class keeps its address from being reused by another class.
pub(super) struct Entry {
    _class: Py<PyType>,
    pub(super) kind: Kind,
}

pub(super) static KINDS: LazyLock<Mutex<FxHashMap<usize, Arc<Entry>>>> =
    LazyLock::new(Mutex::default);

pub(super) static ENUM: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static DATETIME: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static DATE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static TIME: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static UUID: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static DECIMAL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static NAMESPACE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
pub(super) static FIELD_MARKER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

pub(super) fn kind_of(ty: &Bound<'_, PyType>) -> PyResult<Arc<Entry>> {
    let addr = ty.as_ptr() as usize;
    if let Some(entry) = KINDS.lock().get(&addr) {
        return Ok(entry.clone());
    }
    // Classified outside the lock: it runs Python code, which may re-enter the encoder.
    let entry = Arc::new(Entry {
        _class: ty.clone().unbind(),
        kind: classify(ty)?,
    });
    let mut kinds = KINDS.lock();
    if kinds.len() < KINDS_CAP {
        kinds.insert(addr, entry.clone());
    }
    Ok(entry)
}

#[cold]
#[inline(never)]
pub(super) fn classify(ty: &Bound<'_, PyType>) -> PyResult<Kind> {
    let py = ty.py();
    let sub = |cell: &PyOnceLock<Py<PyType>>, module: &str, name: &str| -> PyResult<bool> {
        ty.is_subclass(cell.import(py, module, name)?.as_any())
    };
    // Order matters: an Enum may also be an int or a str, a datetime is also a date.
    if ty.is_subclass_of::<PyType>()? || ty.is_subclass_of::<PyBaseException>()? {
        return Ok(Kind::Unsupported);
    }
    if sub(&ENUM, "enum", "Enum")? {
        return Ok(Kind::Enum);
    }
    let builtin = [
        (ty.is_subclass_of::<PyInt>()?, Kind::Int), // bool cannot be subclassed
        (ty.is_subclass_of::<PyFloat>()?, Kind::Float),
        (ty.is_subclass_of::<PyString>()?, Kind::Str),
        (ty.is_subclass_of::<PyDict>()?, Kind::Dict),
        (ty.is_subclass_of::<PyList>()?, Kind::List),
        (ty.is_subclass_of::<PyTuple>()?, Kind::Tuple),
        (
            ty.is_subclass_of::<PySet>()? || ty.is_subclass_of::<PyFrozenSet>()?,
            Kind::Set,
        ),
    ];
    if let Some((_, kind)) = builtin.into_iter().find(|(yes, _)| *yes) {
        return Ok(kind);
    }
    if sub(&DATETIME, "datetime", "datetime")?
        || sub(&DATE, "datetime", "date")?
        || sub(&TIME, "datetime", "time")?
    {
        return Ok(Kind::DateTime);
    }
    if sub(&UUID, "uuid", "UUID")? {
        return Ok(Kind::Uuid);
    }
    if sub(&DECIMAL, "decimal", "Decimal")? {
        return Ok(Kind::Decimal);
    }
    let domain_event = ty.hasattr(intern!(py, "__oxbus_domain_event__"))?;
    if let Some(fields) = ty.getattr_opt(intern!(py, "__dataclass_fields__"))? {
        if let Ok(fields) = fields.cast::<PyDict>() {
            return dataclass_kind(fields).map(Kind::Dataclass);
        }
    }
    // A pydantic model can only exist once pydantic is imported: never import it ourselves.
    if let Some(pydantic) = py
        .import(intern!(py, "sys"))?
        .getattr(intern!(py, "modules"))?
        .cast::<PyDict>()?
        .get_item(intern!(py, "pydantic"))?
    {
        if let Some(base) = pydantic.getattr_opt(intern!(py, "BaseModel"))? {
            if ty.is_subclass(&base)? {
                return Ok(Kind::Pydantic);
            }
        }
    }
    // Objects with a __dict__, defined in Python (not functions, modules, files, ...).
    let has_dict = ty
        .getattr(intern!(py, "__dictoffset__"))?
        .extract::<isize>()?
        != 0;
    let heap_type = ty.getattr(intern!(py, "__flags__"))?.extract::<u64>()? & HEAPTYPE != 0;
    if has_dict && (heap_type || sub(&NAMESPACE, "types", "SimpleNamespace")?) {
        return Ok(Kind::Object { domain_event });
    }
    Ok(Kind::Unsupported)
}

pub(super) fn dataclass_kind(fields: &Bound<'_, PyDict>) -> PyResult<Vec<Py<PyString>>> {
    let py = fields.py();
    // `__dataclass_fields__` also lists ClassVar and InitVar pseudo-fields: keep real ones.
    let marker = FIELD_MARKER.get_or_try_init(py, || {
        py.import("dataclasses")?
            .getattr("_FIELD")
            .map(Bound::unbind)
    })?;
    let mut names = Vec::new();
    for field in fields.values() {
        if !field.getattr(intern!(py, "_field_type"))?.is(marker) {
            continue;
        }
        let name = field
            .getattr(intern!(py, "name"))?
            .cast_into::<PyString>()?;
        if !name.to_cow()?.starts_with('_') {
            names.push(PyString::intern(py, &name.to_cow()?).unbind());
        }
    }
    Ok(names)
}
