//! Why encoding stopped, and where. Nothing is built on the way down: a failure carries a
//! path that each container level extends while the error unwinds, so the success path pays
//! nothing for messages like `cannot encode OrderPlaced.items[2].price: value of type
//! 'complex' is not JSON-encodable (...)`.

use std::borrow::Cow;
use std::fmt::Write as _;

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyString;

use super::MAX_DEPTH;
use crate::python::errors;

pub(super) const SUPPORTED: &str =
    "supported: None, bool, int, float (finite), str, list, tuple, dict \
     (str keys), set, frozenset, dataclass, pydantic model, object with a __dict__, datetime, \
     date, time, UUID, Decimal, Enum";

/// One step of a field path.
pub(super) enum Seg {
    Attr(String),
    Index(usize),
    Key(String),
}

pub(super) enum Cause {
    /// Not encodable; the text after `cannot encode <path>: `.
    Message(String),
    /// Python raised while the value was read (a `model_dump`, an `isoformat`, ...).
    Raised(PyErr),
}

/// Why encoding stopped, and where: `path` holds the steps innermost first, pushed by each
/// container as the error unwinds. Boxed so that `Res` stays one word on the success path.
pub(super) struct Failure(Box<Inner>);

pub(super) struct Inner {
    path: Vec<Seg>,
    cause: Cause,
}

pub(super) type Res = Result<(), Failure>;

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure(Box::new(Inner {
            path: Vec::new(),
            cause: Cause::Raised(e),
        }))
    }
}

pub(super) fn fail(msg: String) -> Failure {
    Failure(Box::new(Inner {
        path: Vec::new(),
        cause: Cause::Message(msg),
    }))
}

pub(super) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

pub(super) fn unsupported(obj: &Bound<'_, PyAny>) -> Failure {
    fail(format!(
        "value of type '{}' is not JSON-encodable ({SUPPORTED})",
        type_name(obj)
    ))
}

impl Failure {
    pub(super) fn into_pyerr(self, root: &Bound<'_, PyAny>) -> PyErr {
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
pub(super) fn render_path<'a>(root: &str, segs: impl ExactSizeIterator<Item = &'a Seg>) -> String {
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

#[cold]
#[inline(never)]
pub(super) fn too_deep() -> Failure {
    fail(format!(
        "nesting exceeds {MAX_DEPTH} levels (is there a reference cycle?)"
    ))
}

#[cold]
#[inline(never)]
pub(super) fn at_name(f: Failure, name: &Bound<'_, PyString>) -> Failure {
    at(f, Seg::Attr(name.to_string_lossy().into_owned()))
}

#[cold]
#[inline(never)]
pub(super) fn at_dict_key(f: Failure, key: Result<Cow<'_, str>, Failure>, attrs: bool) -> Failure {
    let key = key.map_or_else(|_| "?".to_owned(), Cow::into_owned);
    at(f, if attrs { Seg::Attr(key) } else { Seg::Key(key) })
}

#[cold]
#[inline(never)]
pub(super) fn at(mut f: Failure, seg: Seg) -> Failure {
    f.0.path.push(seg);
    f
}

#[cold]
#[inline(never)]
pub(super) fn lone_surrogate() -> Failure {
    fail("str contains a lone surrogate, which is not valid UTF-8".to_owned())
}

#[cold]
#[inline(never)]
pub(super) fn bad_key(k: &Bound<'_, PyAny>) -> Failure {
    fail(format!(
        "dict key {} of type '{}' is not a str (JSON object keys must be str, or an Enum with a \
         str value)",
        k.repr().map_or_else(|_| "?".to_owned(), |r| r.to_string()),
        type_name(k)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
