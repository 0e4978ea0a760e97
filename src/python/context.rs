//! Whether the running context's value of a context variable is seen by that context alone.
//!
//! A worker sets the context variable holding the current envelope once per event. Through
//! `PyContextVar_Set` that costs a new variables mapping (a HAMT), a `Token` and their
//! collection: measured with callgrind, a third of everything an event cost. The envelope
//! must stay immutable for any *copy* of the context made while a handler ran (a task it
//! created, a callback it scheduled: they read it later, after the worker moved on), but
//! when no copy shares the value, changing the capsule's pointer in place is the same as
//! setting the variable, for a fraction of the cost.
//!
//! `value_is_private` answers that question from reference counts, reading object graphs
//! the way `gc.get_referents` does (through `tp_traverse`):
//! - the running context's mapping (the HAMT) is referenced by that context only (a copy of
//!   a context shares its mapping: `copy_context()`, every task and every callback handle);
//! - its root node by that mapping only, and the value sits in the root node itself;
//! - the value by that node only (a mapping derived from it, after a copy set another
//!   variable, clones the root node and so adds a reference to the value).
//!
//! Anything else, or any unexpected shape, answers "not private", and the caller sets the
//! variable the ordinary way. Reference counts are not exact on free-threaded builds, nor is
//! `tp_traverse` reachable through the stable ABI: there the answer is always "not private".

#[cfg(not(feature = "abi3"))]
use std::os::raw::{c_int, c_void};
#[cfg(not(feature = "abi3"))]
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering::Relaxed};

#[cfg(not(feature = "abi3"))]
use pyo3::ffi;
use pyo3::prelude::*;

/// What a traversal looks for: the only referent, or one given object.
#[cfg(not(feature = "abi3"))]
struct Visit {
    /// Referents seen.
    n: usize,
    /// The first one seen.
    first: *mut ffi::PyObject,
    /// The object looked for, and whether it was seen.
    target: *mut ffi::PyObject,
    found: bool,
}

#[cfg(not(feature = "abi3"))]
unsafe extern "C" fn visit(obj: *mut ffi::PyObject, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Visit` that `traverse` passes to `tp_traverse`.
    let v = unsafe { &mut *arg.cast::<Visit>() };
    if v.n == 0 {
        v.first = obj;
    }
    v.n += 1;
    v.found |= obj == v.target;
    0
}

/// Visits what `obj` references, as `gc.get_referents(obj)` does; None when its type has no
/// `tp_traverse`.
///
/// # Safety
/// The GIL is held and `obj` is a live object.
#[cfg(not(feature = "abi3"))]
unsafe fn traverse(obj: *mut ffi::PyObject, target: *mut ffi::PyObject) -> Option<Visit> {
    let mut v = Visit {
        n: 0,
        first: std::ptr::null_mut(),
        target,
        found: false,
    };
    // SAFETY: per the caller; the visitor only records pointers.
    unsafe {
        let f = (*ffi::Py_TYPE(obj)).tp_traverse?;
        if f(obj, visit, (&raw mut v).cast()) != 0 {
            return None;
        }
    }
    Some(v)
}

/// The one object `obj` references, if exactly one.
///
/// # Safety
/// As for `traverse`.
#[cfg(not(feature = "abi3"))]
unsafe fn sole_referent(obj: *mut ffi::PyObject) -> Option<*mut ffi::PyObject> {
    // SAFETY: per the caller.
    let v = unsafe { traverse(obj, std::ptr::null_mut()) }?;
    (v.n == 1).then_some(v.first)
}

#[cfg(not(feature = "abi3"))]
/// 1: reference counts are exact (a build with the GIL); 2: they are not; 0: not asked yet.
static EXACT_COUNTS: AtomicU8 = AtomicU8::new(0);

#[cfg(not(feature = "abi3"))]
fn exact_counts(py: Python<'_>) -> bool {
    match EXACT_COUNTS.load(Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let free_threaded = py
                .import("sysconfig")
                .and_then(|m| m.call_method1("get_config_var", ("Py_GIL_DISABLED",)))
                .and_then(|v| v.is_truthy())
                .unwrap_or(true);
            EXACT_COUNTS.store(if free_threaded { 2 } else { 1 }, Relaxed);
            !free_threaded
        }
    }
}

/// Whether `value`, the value of a context variable in the running context, is seen by the
/// running context alone; `held` is how many references to it the caller holds. See the
/// module documentation.
#[cfg(not(feature = "abi3"))]
pub fn value_is_private(py: Python<'_>, value: &Bound<'_, PyAny>, held: isize) -> PyResult<bool> {
    if !exact_counts(py) {
        return Ok(false);
    }
    // SAFETY: the GIL is held; every pointer below comes from live objects reached through
    // `tp_traverse` of objects we hold references to (the copy, then its mapping, which the
    // copy keeps alive), and is only compared and read for its reference count.
    unsafe {
        let copy = ffi::PyContext_CopyCurrent();
        if copy.is_null() {
            return Err(PyErr::fetch(py));
        }
        let copy = Bound::from_owned_ptr(py, copy);
        // The copy's only referent is the mapping it shares with the running context.
        let Some(vars) = sole_referent(copy.as_ptr()) else {
            return Ok(false);
        };
        if ffi::Py_REFCNT(vars) != 2 {
            return Ok(false); // another copy shares it
        }
        let Some(root) = sole_referent(vars) else {
            return Ok(false);
        };
        if ffi::Py_REFCNT(root) != 1 {
            return Ok(false);
        }
        let v = value.as_ptr();
        match traverse(root, v) {
            // Held by the root node and by the caller, nothing else.
            Some(seen) if seen.found => Ok(ffi::Py_REFCNT(v) == 1 + held),
            // Elsewhere (deeper in the mapping, where sharing is not seen from here), or not
            // the running context's value at all.
            _ => Ok(false),
        }
    }
}

/// `value_is_private` without copying the running context, for a worker whose task runs in
/// `ctx` (created with `create_task(..., context=ctx)`, Python 3.11+): `value` must also be
/// what `var` holds in the running context (`got`, a reference the check takes). Then `value`
/// referenced by one mapping node besides the caller and `got`, that node the root of `ctx`'s
/// mapping and referenced by it alone, and that mapping by `ctx` alone, prove that the running
/// context is `ctx` (its mapping reaches the same node, whose only referrer is `ctx`'s mapping,
/// which only `ctx` holds) and that no copy of it exists.
#[cfg(not(feature = "abi3"))]
pub fn value_is_private_in(
    py: Python<'_>,
    ctx: &Bound<'_, PyAny>,
    got: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    held: isize,
) -> bool {
    if !exact_counts(py) || got.as_ptr() != value.as_ptr() {
        return false;
    }
    // SAFETY: the GIL is held; `ctx` is a live context we hold; every pointer below is reached
    // through `tp_traverse` of objects kept alive by it, and is only compared, read for its
    // type and reference count, or traversed.
    unsafe {
        // A context references the context it was entered from (while entered) and its
        // mapping: the mapping is the referent whose type is CPython's `hamt`.
        let Some(vars) = hamt_referent(ctx.as_ptr()) else {
            return false;
        };
        if ffi::Py_REFCNT(vars) != 1 {
            return false; // a copy shares it
        }
        let Some(root) = sole_referent(vars) else {
            return false;
        };
        if ffi::Py_REFCNT(root) != 1 {
            return false;
        }
        let v = value.as_ptr();
        match traverse(root, v) {
            // Held by the root node, by the caller and by `got`, nothing else.
            Some(seen) if seen.found => ffi::Py_REFCNT(v) == 2 + held,
            _ => false,
        }
    }
}

/// The referent of `ctx` whose type is named `hamt` (its variables mapping), if one.
///
/// # Safety
/// As for `traverse`.
#[cfg(not(feature = "abi3"))]
unsafe fn hamt_referent(ctx: *mut ffi::PyObject) -> Option<*mut ffi::PyObject> {
    unsafe extern "C" fn collect(obj: *mut ffi::PyObject, arg: *mut c_void) -> c_int {
        // SAFETY: `arg` is the array below; at most its two slots are written.
        let seen = unsafe { &mut *arg.cast::<(usize, [*mut ffi::PyObject; 2])>() };
        if seen.0 < 2 {
            seen.1[seen.0] = obj;
        }
        seen.0 += 1;
        0
    }
    let mut seen: (usize, [*mut ffi::PyObject; 2]) = (0, [std::ptr::null_mut(); 2]);
    // SAFETY: per the caller; the visitor only records pointers.
    unsafe {
        let f = (*ffi::Py_TYPE(ctx)).tp_traverse?;
        if f(ctx, collect, (&raw mut seen).cast()) != 0 || seen.0 > 2 {
            return None;
        }
        let mut found = None;
        for &obj in &seen.1[..seen.0] {
            if is_hamt(obj) {
                if found.is_some() {
                    return None;
                }
                found = Some(obj);
            }
        }
        found
    }
}

/// CPython's `hamt` type, once seen: a static type, at one address for the process.
#[cfg(not(feature = "abi3"))]
static HAMT_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(std::ptr::null_mut());

/// Whether `obj` is a `hamt` (a context's variables mapping). By name the first time, then
/// by the type's address: the name's `strlen` and compare, for two referents per event, were
/// ~1.2% of an in-memory event's samples.
///
/// # Safety
/// `obj` is a live object and the GIL is held.
#[cfg(not(feature = "abi3"))]
unsafe fn is_hamt(obj: *mut ffi::PyObject) -> bool {
    // SAFETY: per the caller.
    let ty = unsafe { ffi::Py_TYPE(obj) };
    let known = HAMT_TYPE.load(Relaxed);
    if !known.is_null() {
        return ty == known;
    }
    // SAFETY: a live type's `tp_name` is a NUL-terminated C string.
    let name = unsafe { std::ffi::CStr::from_ptr((*ty).tp_name) };
    let hamt = name.to_bytes() == b"hamt";
    if hamt {
        HAMT_TYPE.store(ty, Relaxed);
    }
    hamt
}

/// The stable ABI reaches neither `tp_traverse` nor `PyContext_CopyCurrent`.
#[cfg(feature = "abi3")]
#[allow(clippy::unnecessary_wraps)] // the signature of the other build's
pub fn value_is_private(
    _py: Python<'_>,
    _value: &Bound<'_, PyAny>,
    _held: isize,
) -> PyResult<bool> {
    Ok(false)
}

/// See the other build's.
#[cfg(feature = "abi3")]
pub fn value_is_private_in(
    _py: Python<'_>,
    _ctx: &Bound<'_, PyAny>,
    _got: &Bound<'_, PyAny>,
    _value: &Bound<'_, PyAny>,
    _held: isize,
) -> bool {
    false
}
