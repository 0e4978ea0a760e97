//! An event as a log record (`NewEvent`), built in Rust: its type key, version, id, data,
//! metadata and time, and the bus log's stream it goes to. A leaf of `store`.

use parking_lot::Mutex;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyString, PyType};

use crate::python::envelope::{self, new_event_id};
use crate::python::json::records::Metadata;
use crate::python::{errors, events, json};
use crate::store::log::NewEvent;
use crate::store::record::iso_of_timestamp;

/// An attribute of an event (an item of a dict event), None when missing or None.
fn lookup<'py>(
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
/// UTC), in ISO 8601. Written from the creation timestamp in Rust when it is a float (the
/// descriptor makes the same `datetime` from it when read), else through Python.
fn default_occurred_at(
    event: &Bound<'_, PyAny>,
    dict: Option<&Bound<'_, PyDict>>,
) -> PyResult<Option<String>> {
    let py = event.py();
    let d = dict.expect("lazy attributes come with a __dict__");
    let at = match d.get_item(intern!(py, "_oxbus_ts"))? {
        Some(ts) if ts.is_truthy()? => {
            if let Some(iso) = ts
                .cast_exact::<pyo3::types::PyFloat>()
                .ok()
                .and_then(|f| iso_of_timestamp(f.value()))
            {
                return Ok(Some(iso));
            }
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
pub(super) fn meta_value(v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<serde_json::Value>> {
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
pub(super) fn log_stream(
    event: &Bound<'_, PyAny>,
    key: Option<&Bound<'_, PyAny>>,
) -> PyResult<String> {
    Ok(match events::event_key(event, key)? {
        // Refused here, before anything is written, if the log could not give it back.
        Some(k) => format!("$bus:{}", events::portable_key(&k)?.str()?),
        None => "$bus".to_owned(),
    })
}
