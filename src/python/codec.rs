//! JSON for stored events: a direct Python-object → JSON encoder in orjson's manner and a
//! JSON → Python decoder. JSON only, never pickle.
//!
//! The encoder dispatches on the exact type first (`str`, `int`, `None`, `bool`, `float`,
//! `dict`, `list`, `tuple`), then on a per-class [`Kind`] computed once and cached (Enum,
//! subclasses of the built-ins, sets, `datetime`/`date`/`time`, `UUID`, `Decimal`, dataclasses,
//! pydantic v2 models, plain objects with a `__dict__`), and writes everything into one
//! `String` in one pass. Nothing is built on the way down for error reporting: a failure carries
//! a path that each container level extends while the error unwinds, so the success path pays
//! nothing for messages like `cannot encode OrderPlaced.items[2].price: value of type 'complex'
//! is not JSON-encodable (...)`. Nesting is capped at [`MAX_DEPTH`], which turns a reference
//! cycle into an error instead of a stack overflow; the recursive frames keep only what they
//! need across the recursion (the rest is in `#[inline(never)]` helpers), about 250 bytes of
//! stack per level, so even a thread with a small stack (musl's 128 KiB) gets through.
//!
//! The decoder builds Python objects directly (no intermediate tree) and keeps the containers
//! it is filling on the heap, so deep input costs no stack. Integers too large for `i64`/`u64`
//! go through Python's `int(str)`, so they come back exact.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;
use pyo3::exceptions::{PyAttributeError, PyBaseException, PyException};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyDate, PyDateAccess, PyDateTime, PyDelta, PyDeltaAccess, PyDict, PyFloat, PyFrozenSet,
    PyInt, PyList, PySet, PyString, PyTimeAccess, PyTuple, PyType, PyTzInfo, PyTzInfoAccess,
};
use pyo3::IntoPyObjectExt;
use rustc_hash::FxHashMap;

use crate::python::errors;

/// The deepest nesting the encoder follows (containers, objects and Enum values each count one
/// level); deeper input is refused as a probable reference cycle.
pub const MAX_DEPTH: usize = 255;

/// The deepest nesting the decoder accepts.
const DECODE_MAX_DEPTH: usize = 1024;

/// `Py_TPFLAGS_HEAPTYPE`: the class was made by a class statement (or `type(...)`).
const HEAPTYPE: u64 = 1 << 9;

/// Classes whose [`Kind`] is cached at most; further classes are classified on each use.
const KINDS_CAP: usize = 4096;

const SUPPORTED: &str = "supported: None, bool, int, float (finite), str, list, tuple, dict \
     (str keys), set, frozenset, dataclass, pydantic model, object with a __dict__, datetime, \
     date, time, UUID, Decimal, Enum";

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

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

/// `obj.isoformat()` for a `datetime`, `date` or `time` (exact ones written in Rust), or for
/// anything else with an `isoformat` method; None for the rest.
pub fn isoformat(obj: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    let py = obj.py();
    if obj.cast_exact::<PyDateTime>().is_ok() || obj.cast_exact::<PyDate>().is_ok() {
        let mut enc = Encoder {
            out: String::with_capacity(34),
        };
        enc.datetime(obj).map_err(|f| f.into_pyerr(obj))?;
        // Written as a JSON string of ASCII digits and punctuation: only the quotes to drop.
        return Ok(Some(enc.out[1..enc.out.len() - 1].to_owned()));
    }
    if obj.hasattr(intern!(py, "isoformat"))? {
        return Ok(Some(
            obj.call_method0(intern!(py, "isoformat"))?
                .str()?
                .to_string(),
        ));
    }
    Ok(None)
}

/// Encodes a Python object as compact JSON text (see `oxbus.errors.SerializationError` for
/// what cannot be encoded).
#[pyfunction]
pub fn encode_json(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    encode(obj)
}

/// One step of a field path.
enum Seg {
    Attr(String),
    Index(usize),
    Key(String),
}

enum Cause {
    /// Not encodable; the text after `cannot encode <path>: `.
    Message(String),
    /// Python raised while the value was read (a `model_dump`, an `isoformat`, ...).
    Raised(PyErr),
}

/// Why encoding stopped, and where: `path` holds the steps innermost first, pushed by each
/// container as the error unwinds. Boxed so that `Res` stays one word on the success path.
struct Failure(Box<Inner>);

struct Inner {
    path: Vec<Seg>,
    cause: Cause,
}

type Res = Result<(), Failure>;

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure(Box::new(Inner {
            path: Vec::new(),
            cause: Cause::Raised(e),
        }))
    }
}

fn fail(msg: String) -> Failure {
    Failure(Box::new(Inner {
        path: Vec::new(),
        cause: Cause::Message(msg),
    }))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

fn unsupported(obj: &Bound<'_, PyAny>) -> Failure {
    fail(format!(
        "value of type '{}' is not JSON-encodable ({SUPPORTED})",
        type_name(obj)
    ))
}

impl Failure {
    fn into_pyerr(self, root: &Bound<'_, PyAny>) -> PyErr {
        let py = root.py();
        let Inner { path, cause } = *self.0;
        let path = render_path(&type_name(root), path.iter().rev());
        match cause {
            Cause::Message(msg) => {
                errors::serialization_error(format!("cannot encode {path}: {msg}"))
            }
            // KeyboardInterrupt, SystemExit, ... pass through untouched.
            Cause::Raised(e) if !e.is_instance_of::<PyException>(py) => e,
            Cause::Raised(e) => {
                let exc = e
                    .get_type(py)
                    .name()
                    .map_or_else(|_| "Exception".to_owned(), |n| n.to_string());
                let err = errors::serialization_error(format!(
                    "cannot encode {path}: reading it raised {exc}: {}",
                    e.value(py)
                ));
                err.set_cause(py, Some(e));
                err
            }
        }
    }
}

/// `Root.field[2]["key"]`, with the middle of very long paths (cycles) elided.
fn render_path<'a>(root: &str, segs: impl ExactSizeIterator<Item = &'a Seg>) -> String {
    const HEAD: usize = 8;
    const TAIL: usize = 3;
    let n = segs.len();
    let mut out = root.to_owned();
    for (i, seg) in segs.enumerate() {
        if n > HEAD + TAIL + 1 && i >= HEAD && i < n - TAIL {
            if i == HEAD {
                let _ = write!(out, "...({} more)...", n - HEAD - TAIL);
            }
            continue;
        }
        let _ = match seg {
            Seg::Attr(name) => write!(out, ".{name}"),
            Seg::Index(i) => write!(out, "[{i}]"),
            Seg::Key(k) => write!(out, "[{k:?}]"),
        };
    }
    out
}

/// How instances of a class (other than the exact built-ins) are encoded; computed once per
/// class by [`classify`].
enum Kind {
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
struct Entry {
    _class: Py<PyType>,
    kind: Kind,
}

static KINDS: LazyLock<Mutex<FxHashMap<usize, Arc<Entry>>>> = LazyLock::new(Mutex::default);

static ENUM: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static DATETIME: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static DATE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static TIME: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static UUID: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static DECIMAL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static NAMESPACE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static FIELD_MARKER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static INT_REPR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static MODEL_DUMP_KWARGS: PyOnceLock<Py<PyDict>> = PyOnceLock::new();

fn kind_of(ty: &Bound<'_, PyType>) -> PyResult<Arc<Entry>> {
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
fn classify(ty: &Bound<'_, PyType>) -> PyResult<Kind> {
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

fn dataclass_kind(fields: &Bound<'_, PyDict>) -> PyResult<Vec<Py<PyString>>> {
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

    /// ISO 8601 as `isoformat()` writes it. Exact `datetime` and `date` are written from their
    /// fields (an aware datetime asks its tzinfo for the offset, except for `timezone.utc`);
    /// `time` and subclasses call their own `isoformat()`.
    #[inline(never)]
    fn datetime(&mut self, obj: &Bound<'_, PyAny>) -> Res {
        let py = obj.py();
        if let Ok(dt) = obj.cast_exact::<PyDateTime>() {
            let offset = match dt.get_tzinfo() {
                None => None,
                Some(tz) if tz.is(&*PyTzInfo::utc(py)?) => Some(0),
                Some(tz) => {
                    let off = tz.call_method1(intern!(py, "utcoffset"), (dt,))?;
                    match off.cast::<PyDelta>() {
                        Ok(d) => Some(
                            (i64::from(d.get_days()) * 86_400 + i64::from(d.get_seconds()))
                                * 1_000_000
                                + i64::from(d.get_microseconds()),
                        ),
                        Err(_) => None, // utcoffset() returned None: naive
                    }
                }
            };
            let out = &mut self.out;
            out.push('"');
            write_date(out, dt.get_year(), dt.get_month(), dt.get_day());
            let _ = write!(
                out,
                "T{:02}:{:02}:{:02}",
                dt.get_hour(),
                dt.get_minute(),
                dt.get_second()
            );
            if dt.get_microsecond() != 0 {
                let _ = write!(out, ".{:06}", dt.get_microsecond());
            }
            if let Some(us) = offset {
                write_offset(out, us);
            }
            out.push('"');
            return Ok(());
        }
        if let Ok(d) = obj.cast_exact::<PyDate>() {
            self.out.push('"');
            write_date(&mut self.out, d.get_year(), d.get_month(), d.get_day());
            self.out.push('"');
            return Ok(());
        }
        let text = obj.call_method0(intern!(py, "isoformat"))?;
        self.str(text.cast::<PyString>().map_err(PyErr::from)?)
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
                .map_err(|f| at_dict_key(f, &k, attrs))?;
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

/// A dataclass field's value; `None` for an `init=False` field never set (nothing to store).
#[inline(never)]
fn read_field<'py>(
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
fn instance_dict<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    Ok(obj
        .getattr(intern!(obj.py(), "__dict__"))?
        .cast_into::<PyDict>()?)
}

/// A `__dict__` key as an attribute name to write, or `None` to skip it (not a str, private,
/// or one of a `DomainEvent`'s own attributes).
#[inline(never)]
fn public_name<'a, 'py>(
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
fn skip_cached_default(obj: &Bound<'_, PyAny>, name: &str, v: &Bound<'_, PyAny>) -> PyResult<bool> {
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

#[cold]
#[inline(never)]
fn too_deep() -> Failure {
    fail(format!(
        "nesting exceeds {MAX_DEPTH} levels (is there a reference cycle?)"
    ))
}

#[inline(never)]
fn enum_value<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    obj.getattr(intern!(obj.py(), "_value_"))
}

#[inline(never)]
fn set_items<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    obj.try_iter()?.collect()
}

#[inline(never)]
fn model_dump<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let kwargs = MODEL_DUMP_KWARGS.get_or_try_init(py, || {
        let kw = PyDict::new(py);
        kw.set_item("mode", "python")?;
        PyResult::Ok(kw.unbind())
    })?;
    obj.call_method(intern!(py, "model_dump"), (), Some(kwargs.bind(py)))
}

#[cold]
#[inline(never)]
fn at_name(f: Failure, name: &Bound<'_, PyString>) -> Failure {
    at(f, Seg::Attr(name.to_string_lossy().into_owned()))
}

#[cold]
#[inline(never)]
fn at_dict_key(f: Failure, k: &Bound<'_, PyAny>, attrs: bool) -> Failure {
    let key = dict_key(k).map_or_else(|_| "?".to_owned(), Cow::into_owned);
    at(f, if attrs { Seg::Attr(key) } else { Seg::Key(key) })
}

#[cold]
#[inline(never)]
fn at(mut f: Failure, seg: Seg) -> Failure {
    f.0.path.push(seg);
    f
}

/// A dict key as text: a `str` (or subclass), or an Enum member with a `str` value.
fn dict_key<'a>(k: &'a Bound<'_, PyAny>) -> Result<Cow<'a, str>, Failure> {
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

fn str_text<'a>(s: &'a Bound<'_, PyString>) -> Result<Cow<'a, str>, Failure> {
    s.to_cow().map_err(|_| lone_surrogate())
}

#[cold]
#[inline(never)]
fn lone_surrogate() -> Failure {
    fail("str contains a lone surrogate, which is not valid UTF-8".to_owned())
}

#[cold]
#[inline(never)]
fn bad_key(k: &Bound<'_, PyAny>) -> Failure {
    fail(format!(
        "dict key {} of type '{}' is not a str (JSON object keys must be str, or an Enum with a \
         str value)",
        k.repr().map_or_else(|_| "?".to_owned(), |r| r.to_string()),
        type_name(k)
    ))
}

/// What follows a backslash for bytes that need escaping: 0 = none, `u` = `\u00XX`.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Writes `s` as a JSON string: quotes, backslashes and control characters escaped, the rest
/// (non-ASCII included) as UTF-8.
pub fn write_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc = ESCAPE[b as usize];
        if esc == 0 {
            continue;
        }
        // Escaped bytes are ASCII, so `start..i` are char boundaries.
        out.push_str(&s[start..i]);
        out.push('\\');
        if esc == b'u' {
            out.push_str("u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        } else {
            out.push(esc as char);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn write_date(out: &mut String, year: i32, month: u8, day: u8) {
    let _ = write!(out, "{year:04}-{month:02}-{day:02}");
}

/// A UTC offset in microseconds as `isoformat()` writes it: `+HH:MM`, then `:SS` and
/// `.ffffff` only when non-zero.
fn write_offset(out: &mut String, us: i64) {
    let sign = if us < 0 { '-' } else { '+' };
    let us = us.unsigned_abs();
    let (secs, micros) = (us / 1_000_000, us % 1_000_000);
    let _ = write!(out, "{sign}{:02}:{:02}", secs / 3600, secs / 60 % 60);
    if secs % 60 != 0 || micros != 0 {
        let _ = write!(out, ":{:02}", secs % 60);
    }
    if micros != 0 {
        let _ = write!(out, ".{micros:06}");
    }
}

/// Writes a UUID as its canonical quoted text, `"12345678-1234-5678-1234-567812345678"`.
fn write_uuid(out: &mut String, v: u128) {
    let hex = format!("{v:032x}");
    out.push('"');
    for (i, range) in [0..8, 8..12, 12..16, 16..20, 20..32]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            out.push('-');
        }
        out.push_str(&hex[range]);
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Decodes JSON text into `dict`, `list`, `str`, `int` (any size, exact), `float`, `bool` and
/// `None`. Malformed text raises `oxbus.errors.SerializationError` with the line and column.
pub fn decode<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    let mut p = Parser {
        py,
        src: text,
        pos: 0,
    };
    let value = p.parse()?;
    p.ws();
    if p.pos < text.len() {
        return Err(p.error("unexpected data after the JSON value"));
    }
    Ok(value)
}

/// Decodes JSON text into `dict`, `list`, `str`, `int`, `float`, `bool` and `None`.
#[pyfunction]
pub fn decode_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    decode(py, text)
}

/// A container being filled: the parser keeps these on the heap, not on the call stack, so
/// deep input costs no stack (threads may have small stacks).
enum Open<'py> {
    List(Vec<Bound<'py, PyAny>>),
    /// The dict and the key of the value being parsed.
    Dict(Bound<'py, PyDict>, Bound<'py, PyString>),
}

struct Parser<'a, 'py> {
    py: Python<'py>,
    src: &'a str,
    pos: usize,
}

impl<'a, 'py> Parser<'a, 'py> {
    fn error(&self, msg: &str) -> PyErr {
        let before = &self.src[..self.pos.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        errors::serialization_error(format!(
            "cannot decode JSON: {msg} at line {line}, column {column}"
        ))
    }

    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, b: u8, what: &str) -> PyResult<()> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected {what}")))
        }
    }

    /// One JSON value, containers included, without recursion.
    fn parse(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let mut stack: Vec<Open<'py>> = Vec::new();
        'value: loop {
            self.ws();
            let mut value = match self.peek() {
                Some(b'[') => {
                    self.pos += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                        PyList::empty(py).into_any()
                    } else {
                        self.open(&mut stack, Open::List(Vec::new()))?;
                        continue 'value;
                    }
                }
                Some(b'{') => {
                    self.pos += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                        PyDict::new(py).into_any()
                    } else {
                        let key = self.key()?;
                        self.open(&mut stack, Open::Dict(PyDict::new(py), key))?;
                        continue 'value;
                    }
                }
                _ => self.scalar()?,
            };
            // The value is complete: put it in its container, and close every container that
            // ends here.
            loop {
                let Some(top) = stack.last_mut() else {
                    return Ok(value);
                };
                self.ws();
                match top {
                    Open::List(items) => {
                        items.push(value);
                        match self.peek() {
                            Some(b',') => {
                                self.pos += 1;
                                continue 'value;
                            }
                            Some(b']') => self.pos += 1,
                            _ => return Err(self.error("expected ',' or ']'")),
                        }
                    }
                    Open::Dict(dict, key) => {
                        dict.set_item(&*key, value)?;
                        match self.peek() {
                            Some(b',') => {
                                self.pos += 1;
                                self.ws();
                                *key = self.key()?;
                                continue 'value;
                            }
                            Some(b'}') => self.pos += 1,
                            _ => return Err(self.error("expected ',' or '}'")),
                        }
                    }
                }
                value = match stack.pop() {
                    Some(Open::List(items)) => PyList::new(py, items)?.into_any(),
                    Some(Open::Dict(dict, _)) => dict.into_any(),
                    None => unreachable!("the stack had a top"),
                };
            }
        }
    }

    fn open(&self, stack: &mut Vec<Open<'py>>, container: Open<'py>) -> PyResult<()> {
        if stack.len() >= DECODE_MAX_DEPTH {
            return Err(self.error(&format!("nesting exceeds {DECODE_MAX_DEPTH} levels")));
        }
        stack.push(container);
        Ok(())
    }

    fn literal(&mut self, word: &str, value: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        if self.src[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.error("expected a value"))
        }
    }

    /// `"key"` and the `:` after it.
    fn key(&mut self) -> PyResult<Bound<'py, PyString>> {
        if self.peek() != Some(b'"') {
            return Err(self.error("expected a string key"));
        }
        let key = PyString::new(self.py, &self.string()?);
        self.ws();
        self.expect(b':', "':'")?;
        Ok(key)
    }

    fn scalar(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        match self.peek() {
            Some(b'"') => Ok(PyString::new(py, &self.string()?).into_any()),
            Some(b't') => self.literal("true", PyBool::new(py, true).to_owned().into_any()),
            Some(b'f') => self.literal("false", PyBool::new(py, false).to_owned().into_any()),
            Some(b'n') => self.literal("null", py.None().into_bound(py)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("expected a value")),
            None => Err(self.error("unexpected end of input, expected a value")),
        }
    }

    /// A string starting at `"`; borrowed from the input unless it has escapes.
    fn string(&mut self) -> PyResult<Cow<'a, str>> {
        self.pos += 1; // '"'
        let src: &'a str = self.src;
        let bytes = src.as_bytes();
        let start = self.pos;
        loop {
            match bytes.get(self.pos) {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Cow::Borrowed(&src[start..self.pos - 1]));
                }
                Some(b'\\') => break,
                Some(&b) if b < 0x20 => return Err(self.error("control character in string")),
                Some(_) => self.pos += 1,
            }
        }
        let mut out = String::from(&src[start..self.pos]);
        loop {
            let run = self.pos;
            while let Some(&b) = bytes.get(self.pos) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(&src[run..self.pos]);
            match bytes.get(self.pos) {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = match bytes.get(self.pos) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.pos += 1;
                            out.push(self.unicode_escape()?);
                            continue;
                        }
                        _ => return Err(self.error("invalid escape in string")),
                    };
                    self.pos += 1;
                    out.push(c);
                }
                Some(_) => return Err(self.error("control character in string")),
            }
        }
    }

    /// After `\u`: four hex digits, and a second `\uXXXX` for a surrogate pair.
    fn unicode_escape(&mut self) -> PyResult<char> {
        let first = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&first) {
            if !self.src[self.pos..].starts_with("\\u") {
                return Err(self.error("lone surrogate in \\u escape"));
            }
            self.pos += 2;
            let second = self.hex4()?;
            if !(0xDC00..0xE000).contains(&second) {
                return Err(self.error("lone surrogate in \\u escape"));
            }
            0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
        } else {
            first
        };
        char::from_u32(code).ok_or_else(|| self.error("lone surrogate in \\u escape"))
    }

    fn hex4(&mut self) -> PyResult<u32> {
        let digits = self
            .src
            .get(self.pos..self.pos + 4)
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.error("expected four hex digits after \\u"))?;
        self.pos += 4;
        u32::from_str_radix(digits, 16).map_err(|_| self.error("invalid \\u escape"))
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.error("invalid number")),
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.error("expected digits after '.'"));
            }
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("expected digits in the exponent"));
            }
            float = true;
        }
        let text = &self.src[start..self.pos];
        if float {
            let v: f64 = text.parse().map_err(|_| self.error("invalid number"))?;
            return Ok(PyFloat::new(py, v).into_any());
        }
        if let Ok(v) = text.parse::<i64>() {
            return v.into_bound_py_any(py);
        }
        if let Ok(v) = text.parse::<u64>() {
            return v.into_bound_py_any(py);
        }
        py.get_type::<PyInt>().call1((text,))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        write_str(&mut out, s);
        out
    }

    #[test]
    fn strings_escape_quotes_backslashes_and_control_characters_only() {
        assert_eq!(escaped("plain"), r#""plain""#);
        assert_eq!(escaped("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(escaped("\n\t\u{1}"), r#""\n\t\u0001""#);
        assert_eq!(escaped("é€😀/"), "\"é€😀/\"");
    }

    #[test]
    fn uuids_use_the_canonical_form() {
        let mut out = String::new();
        write_uuid(&mut out, 0x1234_5678_1234_5678_1234_5678_1234_5678);
        assert_eq!(out, r#""12345678-1234-5678-1234-567812345678""#);
    }

    #[test]
    fn offsets_are_written_as_isoformat_writes_them() {
        let cases = [
            (0, "+00:00"),
            (19_800_000_000, "+05:30"),
            (-3_600_000_000, "-01:00"),
            (3_661_000_000, "+01:01:01"),
            (-1_500_000, "-00:00:01.500000"),
        ];
        for (us, want) in cases {
            let mut out = String::new();
            write_offset(&mut out, us);
            assert_eq!(out, want);
        }
    }

    #[test]
    fn long_paths_elide_their_middle() {
        let segs: Vec<Seg> = (0..20).map(|_| Seg::Key("self".to_owned())).collect();
        let path = render_path("dict", segs.iter());
        assert!(path.starts_with(r#"dict["self"]["self"]"#), "{path}");
        assert!(path.contains("...(9 more)..."), "{path}");
        let short = [
            Seg::Attr("items".to_owned()),
            Seg::Index(2),
            Seg::Attr("price".to_owned()),
        ];
        assert_eq!(
            render_path("OrderPlaced", short.iter()),
            "OrderPlaced.items[2].price"
        );
    }
}
