//! Python objects → JSON text, in orjson's manner: the encoder dispatches on the exact type
//! first (`str`, `int`, `None`, `bool`, `float`, `dict`, `list`, `tuple`), then on the cached
//! [`kind::Kind`] of the class, and writes everything into one `String` in one pass.
//!
//! Nesting is capped at [`MAX_DEPTH`], which turns a reference cycle into an error instead of
//! a stack overflow; the recursive frames keep only what they need across the recursion (the
//! rest is in `#[inline(never)]` helpers), about 250 bytes of stack per level in a release
//! build, so even a thread with a small stack (musl's 128 KiB) gets through. (A debug build's
//! frames are several times larger: tests/test_codec.py's small-stack test needs a release
//! build, as `./dev.sh test` makes.)

mod datetime;
mod failure;
mod kind;
mod object;

use std::fmt::Write as _;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

pub use datetime::isoformat;
use failure::{at, at_dict_key, at_name, fail, too_deep, unsupported, Res, Seg};
use kind::{kind_of, Kind};
use object::{
    dict_key, enum_value, instance_dict, model_dump, public_name, read_field, set_items, str_text,
};

use super::write::{write_str, write_uuid};

static INT_REPR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The deepest nesting the encoder follows (containers, objects and Enum values each count one
/// level); deeper input is refused as a probable reference cycle.
pub const MAX_DEPTH: usize = 255;

/// Encodes `obj` as compact JSON text.
///
/// Supported: `None`, `bool`, `int` (any size), finite `float`, `str`, `list`, `tuple`, `dict`
/// (keys `str` or an Enum with a `str` value), `set`/`frozenset` (as arrays), dataclass
/// instances (their fields, in order, except names starting with `_`), pydantic v2 models (their
/// `model_dump(mode="python")`), `DomainEvent`s and other objects with a `__dict__` (their
/// public attributes), `datetime`/`date`/`time` (ISO 8601, offset kept, naive stays naive),
/// `UUID` and `Decimal` (strings), Enum members (their value). Anything else raises
/// `oxbus.errors.SerializationError` naming the field path and the type.
///
/// A `DomainEvent` is written as its own fields only: its identity (`event_id`, `occurred_at`,
/// `correlation_id`, `causation_id`) is left to the caller (the store keeps it in columns),
/// as are the `event_type` / `aggregate_id` defaults that reading them caches in a plain
/// event's `__dict__`; so an event encodes the same whether or not those were read.
pub fn encode(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    let mut enc = Encoder {
        out: String::with_capacity(256),
    };
    match enc.value(obj, 0) {
        Ok(()) => Ok(enc.out),
        Err(failure) => Err(failure.into_pyerr(obj)),
    }
}

struct Encoder {
    out: String,
}

impl Encoder {
    fn value(&mut self, obj: &Bound<'_, PyAny>, depth: usize) -> Res {
        if let Ok(s) = obj.cast_exact::<PyString>() {
            return self.str(s);
        }
        if let Ok(i) = obj.cast_exact::<PyInt>() {
            return self.int(i);
        }
        if obj.is_none() {
            self.out.push_str("null");
            return Ok(());
        }
        if let Ok(b) = obj.cast_exact::<PyBool>() {
            self.out
                .push_str(if b.is_true() { "true" } else { "false" });
            return Ok(());
        }
        if let Ok(f) = obj.cast_exact::<PyFloat>() {
            return self.float(f.value());
        }
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        if let Ok(d) = obj.cast_exact::<PyDict>() {
            return self.dict(d, depth, false);
        }
        if let Ok(l) = obj.cast_exact::<PyList>() {
            return self.seq(l.iter(), depth);
        }
        if let Ok(t) = obj.cast_exact::<PyTuple>() {
            return self.seq(t.iter(), depth);
        }
        self.other(obj, depth)
    }

    /// Everything but the exact built-ins, by the cached kind of its class. Only the kinds that
    /// recurse are handled in this frame; leaves go to `leaf`, which is never inlined, so each
    /// level of nesting costs little stack (threads may have small stacks).
    #[inline(never)]
    fn other(&mut self, obj: &Bound<'_, PyAny>, depth: usize) -> Res {
        let entry = kind_of(&obj.get_type())?;
        match &entry.kind {
            Kind::Enum => self.value(&enum_value(obj)?, depth + 1),
            Kind::Dict => self.dict(obj.cast::<PyDict>().map_err(PyErr::from)?, depth, false),
            Kind::List => self.seq(obj.cast::<PyList>().map_err(PyErr::from)?.iter(), depth),
            Kind::Tuple => self.seq(obj.cast::<PyTuple>().map_err(PyErr::from)?.iter(), depth),
            Kind::Set => self.seq(set_items(obj)?.into_iter(), depth),
            Kind::Dataclass(fields) => self.dataclass(obj, fields, depth),
            Kind::Pydantic => {
                let dumped = model_dump(obj)?;
                match dumped.cast::<PyDict>() {
                    Ok(d) => self.dict(d, depth, true),
                    Err(_) => self.value(&dumped, depth + 1),
                }
            }
            Kind::Object { domain_event } => self.object(obj, *domain_event, depth),
            leaf => self.leaf(obj, leaf),
        }
    }

    #[inline(never)]
    fn leaf(&mut self, obj: &Bound<'_, PyAny>, kind: &Kind) -> Res {
        let py = obj.py();
        match kind {
            Kind::Int => self.int(obj.cast::<PyInt>().map_err(PyErr::from)?),
            Kind::Float => self.float(obj.extract::<f64>()?),
            Kind::Str => self.str(obj.cast::<PyString>().map_err(PyErr::from)?),
            Kind::DateTime => self.datetime(obj),
            Kind::Uuid => {
                let v: u128 = obj.getattr(intern!(py, "int"))?.extract()?;
                write_uuid(&mut self.out, v);
                Ok(())
            }
            Kind::Decimal => self.str(&obj.str()?),
            _ => Err(unsupported(obj)),
        }
    }

    fn str(&mut self, s: &Bound<'_, PyString>) -> Res {
        write_str(&mut self.out, &str_text(s)?);
        Ok(())
    }

    fn int(&mut self, i: &Bound<'_, PyInt>) -> Res {
        if let Ok(v) = i.extract::<i64>() {
            let _ = write!(self.out, "{v}");
        } else if let Ok(v) = i.extract::<u64>() {
            let _ = write!(self.out, "{v}");
        } else {
            // `int.__repr__`, not `str()`: a subclass may override `__str__`.
            let py = i.py();
            let repr = INT_REPR.get_or_try_init(py, || {
                py.get_type::<PyInt>()
                    .getattr("__repr__")
                    .map(Bound::unbind)
            })?;
            let text = repr.bind(py).call1((i,))?;
            self.out
                .push_str(&text.cast::<PyString>().map_err(PyErr::from)?.to_cow()?);
        }
        Ok(())
    }

    fn float(&mut self, v: f64) -> Res {
        if !v.is_finite() {
            return Err(fail(format!(
                "float {} is not JSON-encodable (only finite floats are)",
                if v.is_nan() {
                    "nan"
                } else if v > 0.0 {
                    "inf"
                } else {
                    "-inf"
                }
            )));
        }
        // Debug is the shortest text that reads back as the same f64, always with a `.` or an
        // exponent (`1.0`, `1e300`), so it stays a float through a round trip.
        let _ = write!(self.out, "{v:?}");
        Ok(())
    }

    fn seq<'py>(&mut self, items: impl Iterator<Item = Bound<'py, PyAny>>, depth: usize) -> Res {
        self.out.push('[');
        for (i, item) in items.enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.value(&item, depth + 1)
                .map_err(|f| at(f, Seg::Index(i)))?;
        }
        self.out.push(']');
        Ok(())
    }

    // The loops below recurse through `value`; what they do per item besides recursing lives
    // in helpers that are never inlined, so that these frames stay small.

    /// A dict; `attrs` names its entries `.name` in paths (a pydantic model's dump).
    fn dict(&mut self, d: &Bound<'_, PyDict>, depth: usize, attrs: bool) -> Res {
        self.out.push('{');
        let mut first = true;
        for (k, v) in d.iter() {
            self.dict_key(&k, &mut first)?;
            self.value(&v, depth + 1)
                .map_err(|f| at_dict_key(f, dict_key(&k), attrs))?;
        }
        self.out.push('}');
        Ok(())
    }

    fn dataclass(&mut self, obj: &Bound<'_, PyAny>, fields: &[Py<PyString>], depth: usize) -> Res {
        let py = obj.py();
        self.out.push('{');
        let mut first = true;
        for name in fields {
            let name = name.bind(py);
            let Some(value) = read_field(obj, name)? else {
                continue;
            };
            self.key(name, &mut first)?;
            self.value(&value, depth + 1)
                .map_err(|f| at_name(f, name))?;
        }
        self.out.push('}');
        Ok(())
    }

    fn object(&mut self, obj: &Bound<'_, PyAny>, domain_event: bool, depth: usize) -> Res {
        let attrs = instance_dict(obj)?;
        self.out.push('{');
        let mut first = true;
        for (k, v) in attrs.iter() {
            let Some(name) = public_name(obj, &k, &v, domain_event)? else {
                continue;
            };
            self.key(name, &mut first)?;
            self.value(&v, depth + 1).map_err(|f| at_name(f, name))?;
        }
        self.out.push('}');
        Ok(())
    }

    /// `,` unless first, then `"name":`.
    #[inline(never)]
    fn key(&mut self, name: &Bound<'_, PyString>, first: &mut bool) -> Res {
        if !std::mem::take(first) {
            self.out.push(',');
        }
        write_str(&mut self.out, &str_text(name)?);
        self.out.push(':');
        Ok(())
    }

    #[inline(never)]
    fn dict_key(&mut self, k: &Bound<'_, PyAny>, first: &mut bool) -> Res {
        let key = dict_key(k)?;
        if !std::mem::take(first) {
            self.out.push(',');
        }
        write_str(&mut self.out, &key);
        self.out.push(':');
        Ok(())
    }
}
