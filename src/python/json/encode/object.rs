//! Reading what an object holds: dataclass fields, public `__dict__` entries, Enum values,
//! set items, a pydantic model's dump, dict keys as text.

use std::borrow::Cow;

use pyo3::exceptions::PyAttributeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString};

use super::failure::{at_name, bad_key, lone_surrogate, Failure};
use super::kind::{kind_of, Kind};

static MODEL_DUMP_KWARGS: PyOnceLock<Py<PyDict>> = PyOnceLock::new();

/// A dataclass field's value; `None` for an `init=False` field never set (nothing to store).
#[inline(never)]
pub(super) fn read_field<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
) -> Result<Option<Bound<'py, PyAny>>, Failure> {
    match obj.getattr(name) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_instance_of::<PyAttributeError>(obj.py()) => Ok(None),
        Err(e) => Err(at_name(e.into(), name)),
    }
}

#[inline(never)]
pub(super) fn instance_dict<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    Ok(obj
        .getattr(intern!(obj.py(), "__dict__"))?
        .cast_into::<PyDict>()?)
}

/// A `__dict__` key as an attribute name to write, or `None` to skip it (not a str, private,
/// or one of a `DomainEvent`'s own attributes).
#[inline(never)]
pub(super) fn public_name<'a, 'py>(
    obj: &Bound<'py, PyAny>,
    k: &'a Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    domain_event: bool,
) -> PyResult<Option<&'a Bound<'py, PyString>>> {
    let Ok(name) = k.cast::<PyString>() else {
        return Ok(None);
    };
    let text = name.to_cow()?;
    if text.starts_with('_') || (domain_event && skip_cached_default(obj, &text, v)?) {
        return Ok(None);
    }
    Ok(Some(name))
}

/// In a plain `DomainEvent`'s `__dict__`: the identity attributes, and the defaults that reading
/// `event_type` / `aggregate_id` caches there (the bus reads both on publish), so that an event
/// encodes the same before and after it was published.
pub(super) fn skip_cached_default(
    obj: &Bound<'_, PyAny>,
    name: &str,
    v: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    Ok(match name {
        "event_id" | "occurred_at" | "correlation_id" | "causation_id" => true,
        "aggregate_id" => v.is_none(),
        "event_type" => match v.cast::<PyString>() {
            Ok(s) => *s.to_cow()? == *obj.get_type().name()?.to_cow()?,
            Err(_) => false,
        },
        _ => false,
    })
}

#[inline(never)]
pub(super) fn enum_value<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    obj.getattr(intern!(obj.py(), "_value_"))
}

#[inline(never)]
pub(super) fn set_items<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    obj.try_iter()?.collect()
}

#[inline(never)]
pub(super) fn model_dump<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let kwargs = MODEL_DUMP_KWARGS.get_or_try_init(py, || {
        let kw = PyDict::new(py);
        kw.set_item("mode", "python")?;
        PyResult::Ok(kw.unbind())
    })?;
    obj.call_method(intern!(py, "model_dump"), (), Some(kwargs.bind(py)))
}

/// A dict key as text: a `str` (or subclass), or an Enum member with a `str` value.
pub(super) fn dict_key<'a>(k: &'a Bound<'_, PyAny>) -> Result<Cow<'a, str>, Failure> {
    let exact = k.is_exact_instance_of::<PyString>();
    if !exact && matches!(kind_of(&k.get_type())?.kind, Kind::Enum) {
        let value = enum_value(k)?;
        return match value.cast::<PyString>() {
            Ok(v) => Ok(Cow::Owned(str_text(v)?.into_owned())),
            Err(_) => Err(bad_key(k)),
        };
    }
    match k.cast::<PyString>() {
        Ok(s) => str_text(s),
        Err(_) => Err(bad_key(k)),
    }
}

pub(super) fn str_text<'a>(s: &'a Bound<'_, PyString>) -> Result<Cow<'a, str>, Failure> {
    s.to_cow().map_err(|_| lone_surrogate())
}
