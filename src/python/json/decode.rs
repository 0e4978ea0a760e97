//! JSON → Python objects: serde_json parses, and a [`DeserializeSeed`] builds `dict`, `list`,
//! `str`, `int`, `float`, `bool` and `None` as it goes, with no tree in between (the shape of
//! pydantic-core's jiter `python` feature).
//!
//! Numbers arrive as text (serde_json's `arbitrary_precision`): integers that fit `i64`/`u64`
//! are converted directly, larger ones through Python's `int(str)` so they come back exact
//! (and within Python's own digit limit), and floats are parsed from their text, so each is the
//! nearest `f64`, as `json.loads` gives. Nesting is capped at [`MAX_DEPTH`]; the stack grows
//! on the heap when a thread's own runs short (`stacker`), so deep input never overflows a
//! small thread stack.

use std::cell::{Cell, RefCell};
use std::fmt;

use parking_lot::MutexGuard;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString};
use pyo3::IntoPyObjectExt;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::keys::{self, Keys};
use crate::python::errors;

/// The deepest nesting the decoder accepts (arrays and objects each count one level).
pub const MAX_DEPTH: usize = 1024;

/// The name serde_json gives the one key of the map it hands over for a number under
/// `arbitrary_precision` (its value is the number's text).
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Stack left before a container grows a new segment, and that segment's size.
const RED_ZONE: usize = 64 * 1024;
const NEW_STACK: usize = 1024 * 1024;

/// Decodes JSON text into `dict`, `list`, `str`, `int` (any size, exact), `float`, `bool` and
/// `None`. Malformed text raises `oxbus.errors.SerializationError` with the line and column.
pub fn decode<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    parse(py, text).map_err(|e| e.into_pyerr(py))
}

/// Why decoding failed.
#[derive(Debug)]
pub enum DecodeError {
    /// Not JSON, or nested too deep: `<what> at line L, column C`.
    Syntax(String),
    /// Python refused a value (an integer over `sys.get_int_max_str_digits()`, memory), and
    /// where (`line L, column C`).
    Python(PyErr, String),
}

impl DecodeError {
    fn into_pyerr(self, py: Python<'_>) -> PyErr {
        match self {
            DecodeError::Syntax(msg) => {
                errors::serialization_error(format!("cannot decode JSON: {msg}"))
            }
            // The value is not one Python can hold: bad input, said as such.
            DecodeError::Python(e, at) if e.is_instance_of::<PyValueError>(py) => {
                let err = errors::serialization_error(format!(
                    "cannot decode JSON: {} at {at}",
                    e.value(py)
                ));
                err.set_cause(py, Some(e));
                err
            }
            // MemoryError, KeyboardInterrupt, ... pass through untouched.
            DecodeError::Python(e, _) => e,
        }
    }
}

/// Parses `text` into Python objects; errors are kept apart from Python's exception classes.
pub fn parse<'py>(py: Python<'py>, text: &str) -> Result<Bound<'py, PyAny>, DecodeError> {
    let ctx = Ctx {
        py,
        depth: Cell::new(0),
        raised: RefCell::new(None),
        keys: RefCell::new(keys::take()),
    };
    let mut de = serde_json::Deserializer::from_str(text);
    // The depth is capped by `Ctx` (serde_json's own limit is 128).
    de.disable_recursion_limit();
    let value = Value(&ctx)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    value.map_err(|e| {
        let at = format!("line {}, column {}", e.line(), e.column());
        if let Some(raised) = ctx.raised.take() {
            return DecodeError::Python(raised, at);
        }
        // serde_json's message ends with its own "at line L column C".
        let msg = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let what = msg.strip_suffix(&suffix).unwrap_or(&msg);
        DecodeError::Syntax(format!("{what} at {at}"))
    })
}

/// What every seed of one decoding shares.
struct Ctx<'py> {
    py: Python<'py>,
    /// Containers open around the value being built.
    depth: Cell<usize>,
    /// The Python error behind a failure, which serde's error type cannot carry.
    raised: RefCell<Option<PyErr>>,
    /// The key cache, when this decoding got it.
    keys: RefCell<Option<MutexGuard<'static, Keys>>>,
}

impl<'py> Ctx<'py> {
    /// Keeps `err` for the caller and stops the parse.
    #[cold]
    fn raise<E: de::Error>(&self, err: PyErr) -> E {
        *self.raised.borrow_mut() = Some(err);
        E::custom("Python refused the value")
    }

    fn ok<T, E: de::Error>(&self, r: PyResult<T>) -> Result<T, E> {
        r.map_err(|e| self.raise(e))
    }

    /// Enters a container: runs `f` one level deeper, on a stack with room for it (the depth
    /// is checked by each value, [`Value::deserialize`]).
    fn nested<T, E: de::Error>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let depth = self.depth.get();
        self.depth.set(depth + 1);
        let out = stacker::maybe_grow(RED_ZONE, NEW_STACK, f);
        self.depth.set(depth);
        out
    }

    /// Refuses a value inside more than [`MAX_DEPTH`] containers (so an empty container may
    /// sit at the limit, as it always could); `deeper` counts containers not yet entered.
    fn check_depth<E: de::Error>(&self, deeper: usize) -> Result<(), E> {
        if self.depth.get() + deeper > MAX_DEPTH {
            return Err(E::custom(format_args!(
                "nesting exceeds {MAX_DEPTH} levels"
            )));
        }
        Ok(())
    }

    /// A number from its JSON text (serde_json has checked the syntax).
    fn number(&self, text: &str) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        if text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
            let v: f64 = text
                .parse()
                .map_err(|_| PyValueError::new_err(format!("invalid number {text}")))?;
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

/// Seed and visitor of any JSON value.
#[derive(Clone, Copy)]
struct Value<'c, 'py>(&'c Ctx<'py>);

impl<'de, 'py> DeserializeSeed<'de> for Value<'_, 'py> {
    type Value = Bound<'py, PyAny>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.check_depth(0)?;
        d.deserialize_any(self)
    }
}

impl<'de, 'py> Visitor<'de> for Value<'_, 'py> {
    type Value = Bound<'py, PyAny>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.0.py.None().into_bound(self.0.py))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(PyBool::new(self.0.py, v).to_owned().into_any())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.0.ok(v.into_bound_py_any(self.0.py))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.0.ok(v.into_bound_py_any(self.0.py))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(PyFloat::new(self.0.py, v).into_any())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(PyString::new(self.0.py, v).into_any())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let ctx = self.0;
        ctx.nested(|| {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element_seed(self)? {
                items.push(item);
            }
            ctx.ok(PyList::new(ctx.py, items).map(Bound::into_any))
        })
    }

    /// An object, or a number: serde_json hands both over as maps.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.0;
        let Some(first) = map.next_key_seed(Key { ctx, first: true })? else {
            return Ok(PyDict::new(ctx.py).into_any());
        };
        // The first entry: its key, or (the token) its key and value.
        let first = match first {
            FirstKey::Str(k) => (k, None),
            FirstKey::Token => match map.next_value_seed(NumberOr(self))? {
                Number::Text(text) => return ctx.ok(ctx.number(&text)),
                // A real object whose first key is the token (a container value was read
                // one level deeper: see `NumberOr`); the value sits one level deeper.
                Number::Value(v) => {
                    ctx.check_depth(1)?;
                    (PyString::new(ctx.py, NUMBER_TOKEN), Some(v))
                }
            },
        };
        ctx.nested(|| {
            let dict = PyDict::new(ctx.py);
            let (k, v) = match first {
                (k, Some(v)) => (k, v),
                (k, None) => (k, map.next_value_seed(self)?),
            };
            ctx.ok(dict.set_item(k, v))?;
            while let Some(FirstKey::Str(k)) = map.next_key_seed(Key { ctx, first: false })? {
                let v = map.next_value_seed(self)?;
                ctx.ok(dict.set_item(k, v))?;
            }
            Ok(dict.into_any())
        })
    }
}

/// An object key; the first one may be serde_json's number token.
enum FirstKey<'py> {
    Str(Bound<'py, PyString>),
    Token,
}

struct Key<'c, 'py> {
    ctx: &'c Ctx<'py>,
    first: bool,
}

impl<'de, 'py> DeserializeSeed<'de> for Key<'_, 'py> {
    type Value = FirstKey<'py>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 'py> Visitor<'de> for Key<'_, 'py> {
    type Value = FirstKey<'py>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        if self.first && v == NUMBER_TOKEN {
            return Ok(FirstKey::Token);
        }
        self.visit_str(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let py = self.ctx.py;
        Ok(FirstKey::Str(match self.ctx.keys.borrow_mut().as_mut() {
            Some(keys) => keys.get(py, v),
            None => PyString::new(py, v),
        }))
    }
}

/// The value after serde_json's number token: the number's text (an owned `String`, which
/// serde_json never hands over for a string in the input), or a value of a real object.
enum Number<'py> {
    Text(String),
    Value(Bound<'py, PyAny>),
}

struct NumberOr<'c, 'py>(Value<'c, 'py>);

impl<'de, 'py> DeserializeSeed<'de> for NumberOr<'_, 'py> {
    type Value = Number<'py>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*) $(<$a:ident: $bound:path>)?;)*) => {$(
        fn $name<$($a: $bound,)? E: de::Error>(self, $($arg: $ty),*) -> Result<Self::Value, E> {
            self.0.$name($($arg),*).map(Number::Value)
        }
    )*};
}

impl<'de, 'py> Visitor<'de> for NumberOr<'_, 'py> {
    type Value = Number<'py>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Number::Text(v))
    }

    forward! {
        visit_unit();
        visit_bool(v: bool);
        visit_i64(v: i64);
        visit_u64(v: u64);
        visit_f64(v: f64);
        visit_str(v: &str);
    }

    // A container here is the first value of an object not yet counted: one level for that
    // object (`visit_map` checks the depth of the value once it knows it is not a number).
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let ctx = self.0 .0;
        ctx.nested(|| self.0.visit_seq(seq).map(Number::Value))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.0 .0;
        ctx.nested(|| self.0.visit_map(map).map(Number::Value))
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;

    use super::*;

    /// Decodes `text` and checks it equals the Python expression `want` (and its type).
    fn check(text: &str, want: &str) {
        Python::attach(|py| {
            let got = parse(py, text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            let want = py.eval(&CString::new(want).unwrap(), None, None).unwrap();
            assert!(got.eq(&want).unwrap(), "{text}: got {got}, want {want}");
            assert!(got.get_type().is(want.get_type()), "{text}: got {got}");
        });
    }

    fn syntax_error(text: &str) -> String {
        Python::attach(|py| match parse(py, text) {
            Err(DecodeError::Syntax(msg)) => msg,
            other => panic!("{text}: {other:?}"),
        })
    }

    #[test]
    fn values_become_the_python_builtins() {
        Python::initialize();
        check("null", "None");
        check(" true ", "True");
        check("false", "False");
        check(
            r#""a\"b\\c\n\u00e9\ud83d\ude00/""#,
            r#"'a"b\\c\n\u00e9\U0001f600/'"#,
        );
        check("[]", "[]");
        check("{}", "{}");
        check(
            r#"{"k": [1, -2, 2.5, "x", null, {"n": {}}], "e": [[]]}"#,
            "{'k': [1, -2, 2.5, 'x', None, {'n': {}}], 'e': [[]]}",
        );
        check(r#"{"a": 1, "a": 2}"#, "{'a': 2}");
    }

    #[test]
    fn integers_of_any_size_stay_exact_ints_and_floats_stay_floats() {
        Python::initialize();
        check("9223372036854775807", "2**63 - 1");
        check("18446744073709551615", "2**64 - 1");
        check("18446744073709551616", "2**64");
        check("-18446744073709551617", "-(2**64) - 1");
        check(&"7".repeat(300), &format!("int('{}')", "7".repeat(300)));
        check("-0", "0");
        check("1.0", "1.0");
        check("-0.0", "-0.0");
        check("1e2", "100.0");
        check("1E-2", "0.01");
        check("0.1", "0.1");
        check("2.2250738585072011e-308", "2.2250738585072011e-308");
        check("1e400", "float('inf')");
        check(
            "[1, 1.5, 123456789012345678901234567890]",
            "[1, 1.5, 123456789012345678901234567890]",
        );
    }

    #[test]
    fn an_object_keyed_by_serde_jsons_number_token_stays_an_object() {
        Python::initialize();
        let key = NUMBER_TOKEN;
        check(
            &format!(r#"{{"{key}": "1"}}"#),
            &format!("{{'{key}': '1'}}"),
        );
        check(
            &format!(r#"{{"{key}": 5, "b": 2}}"#),
            &format!("{{'{key}': 5, 'b': 2}}"),
        );
        check(
            &format!(r#"{{"{key}": [1.5]}}"#),
            &format!("{{'{key}': [1.5]}}"),
        );
        check(
            &format!(r#"{{"{key}": {{"{key}": null}}}}"#),
            &format!("{{'{key}': {{'{key}': None}}}}"),
        );
    }

    #[test]
    fn object_keys_are_shared_between_decodings_and_stay_right() {
        Python::initialize();
        Python::attach(|py| {
            let key = |text: &str| {
                let d = parse(py, text).unwrap().cast_into::<PyDict>().unwrap();
                d.keys()
                    .get_item(0)
                    .unwrap()
                    .cast_into::<PyString>()
                    .unwrap()
            };
            let a = key(r#"{"order_id": 1}"#);
            assert!(a.is(key(r#"{"order_id": [2]}"#)), "the cached str");
            // Many distinct keys (colliding in slots) and long or non-ASCII ones.
            for i in 0..20_000 {
                let k = format!("k{i}");
                assert_eq!(key(&format!(r#"{{"{k}": 0}}"#)).to_str().unwrap(), k);
            }
            let long = "x".repeat(100);
            assert_eq!(key(&format!(r#"{{"{long}": 0}}"#)).to_str().unwrap(), long);
            assert_eq!(key(r#"{"zoë": 0}"#).to_str().unwrap(), "zoë");
            assert_eq!(key(r#"{"zo\u00eb": 0}"#).to_str().unwrap(), "zoë");
        });
    }

    #[test]
    fn nesting_is_capped_at_1024_levels_whatever_the_containers() {
        Python::initialize();
        let ok = |text: &str| Python::attach(|py| assert!(parse(py, text).is_ok(), "{text:.40}"));
        let (n, m) = (MAX_DEPTH, MAX_DEPTH + 1);
        // 1024 containers with a value inside; an empty container may be the 1025th.
        ok(&format!("{}1{}", "[".repeat(n), "]".repeat(n)));
        ok(&format!("{}{}", "[".repeat(m), "]".repeat(m)));
        ok(&format!("{}{{}}{}", r#"{"a":"#.repeat(n), "}".repeat(n)));
        ok(&format!(
            "{}1{}",
            format!(r#"{{"{NUMBER_TOKEN}":"#).repeat(n),
            "}".repeat(n)
        ));
        ok(&format!(
            "{}[]{}",
            format!(r#"{{"{NUMBER_TOKEN}":"#).repeat(n),
            "}".repeat(n)
        ));
        for text in [
            format!("{}1{}", "[".repeat(m), "]".repeat(m)),
            format!("{}[]{}", "[".repeat(m), "]".repeat(m)),
            format!("{}1{}", r#"{"a":"#.repeat(m), "}".repeat(m)),
            format!(
                "{}1{}",
                format!(r#"{{"{NUMBER_TOKEN}":"#).repeat(m),
                "}".repeat(m)
            ),
            format!(
                "{}[]{}",
                format!(r#"{{"{NUMBER_TOKEN}":"#).repeat(m),
                "}".repeat(m)
            ),
            format!(
                "{}1{}",
                format!(r#"{{"{NUMBER_TOKEN}":["#).repeat(m),
                "]}".repeat(m)
            ),
            "[".repeat(100_000),
        ] {
            let msg = syntax_error(&text);
            assert!(
                msg.starts_with("nesting exceeds 1024 levels at line 1, column "),
                "{text:.40}: {msg}"
            );
        }
    }

    #[test]
    fn deep_input_fits_in_a_small_thread_stack() {
        Python::initialize();
        let text = format!("{}1{}", r#"[{"a":"#.repeat(512), "}]".repeat(512));
        let done = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                Python::attach(|py| parse(py, &text).map(|_| ()).map_err(|e| format!("{e:?}")))
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(done, Ok(()));
    }

    #[test]
    fn malformed_text_is_a_syntax_error_with_its_position() {
        Python::initialize();
        let cases = [
            ("", "EOF while parsing a value at line 1, column 0"),
            ("[1,]", "trailing comma at line 1, column 4"),
            ("{'a': 1}", "key must be a string at line 1, column 2"),
            ("[1] 2", "trailing characters at line 1, column 5"),
            ("NaN", "expected value at line 1, column 1"),
            ("01", "invalid number at line 1, column 2"),
            ("1.", "EOF while parsing a value at line 1, column 2"),
            ("\"open", "EOF while parsing a string at line 1, column 5"),
            ("{\"a\" 1}", "expected `:` at line 1, column 6"),
            ("tru", "EOF while parsing a value at line 1, column 3"),
            (
                "\"\\ud800\"",
                "unexpected end of hex escape at line 1, column 8",
            ),
            (
                "\"\\ud800\\u0041\"",
                "lone leading surrogate in hex escape at line 1, column 13",
            ),
            ("[\n  1\n  2]", "expected `,` or `]` at line 3, column 3"),
        ];
        for (text, want) in cases {
            assert_eq!(syntax_error(text), want, "{text:?}");
        }
    }

    #[test]
    fn an_integer_python_cannot_hold_is_its_error_with_the_position() {
        Python::initialize();
        let text = format!(r#"{{"n": {}}}"#, "9".repeat(100_000));
        Python::attach(|py| match parse(py, &text) {
            Err(DecodeError::Python(e, at)) => {
                assert!(e.is_instance_of::<PyValueError>(py), "{e}");
                assert!(e.to_string().contains("digits"), "{e}");
                assert!(at.starts_with("line 1, column "), "{at}");
            }
            other => panic!("{other:?}"),
        });
    }
}
