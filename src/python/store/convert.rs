//! The writer's answers as Python objects (row tuples, lists, values), and query parameters
//! from Python as SQLite values. A leaf of `store`.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyList, PyTuple};
use rusqlite::types::Value;

use crate::python::errors;
use crate::store::log::{DeadRow, StoredRow};
use crate::store::writer::Reply;

/// A log row as the tuple `oxbus.store` reads.
fn row_to_py(py: Python<'_>, r: StoredRow) -> PyResult<Bound<'_, PyTuple>> {
    (
        r.position,
        r.stream_id,
        r.version,
        r.event_type,
        r.event_version,
        r.data,
        r.metadata,
        r.event_id,
        r.occurred_at,
        r.recorded_at,
    )
        .into_pyobject(py)
}

/// A dead letter as the tuple `oxbus.store` reads.
fn dead_to_py(py: Python<'_>, d: DeadRow) -> PyResult<Bound<'_, PyTuple>> {
    (
        d.id,
        d.position,
        d.subscription,
        d.attempts,
        d.first_failed_at,
        d.last_failed_at,
        d.error_type,
        d.error_message,
        d.traceback,
        d.key_hash,
        d.parked_behind,
    )
        .into_pyobject(py)
}

/// One SQLite value as the Python value it stands for.
fn value_to_py(py: Python<'_>, v: Value) -> PyResult<Bound<'_, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Integer(i) => i.into_pyobject(py)?.into_any(),
        Value::Real(f) => f.into_pyobject(py)?.into_any(),
        Value::Text(t) => t.into_pyobject(py)?.into_any(),
        Value::Blob(b) => pyo3::types::PyBytes::new(py, &b).into_any(),
    })
}

/// One query parameter as an SQLite value: None, bool, int, float, str or bytes.
pub(super) fn value_of(v: &Bound<'_, PyAny>) -> PyResult<Value> {
    if v.is_none() {
        Ok(Value::Null)
    } else if let Ok(b) = v.cast::<PyBool>() {
        Ok(Value::Integer(i64::from(b.is_true())))
    } else if let Ok(i) = v.extract::<i64>() {
        Ok(Value::Integer(i))
    } else if let Ok(f) = v.extract::<f64>() {
        Ok(Value::Real(f))
    } else if let Ok(s) = v.extract::<String>() {
        Ok(Value::Text(s))
    } else if let Ok(b) = v.extract::<Vec<u8>>() {
        Ok(Value::Blob(b))
    } else {
        Err(errors::configuration_error(format!(
            "a query parameter must be None, int, float, str or bytes, got {}",
            v.repr()?
        )))
    }
}

/// What a future of the store resolves with, for one reply of the writer.
pub(super) fn reply_to_py(py: Python<'_>, r: Reply) -> PyResult<Py<PyAny>> {
    Ok(match r {
        Reply::Appended {
            version,
            first_position,
        } => (version, first_position)
            .into_pyobject(py)?
            .into_any()
            .unbind(),
        Reply::Rows(rows) => {
            let items = rows
                .into_iter()
                .map(|r| row_to_py(py, r))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        Reply::Row(r) => match r {
            Some(r) => row_to_py(py, r)?.into_any().unbind(),
            None => py.None(),
        },
        Reply::Snapshot(s) => match s {
            Some(s) => (s.stream_id, s.version, s.state, s.taken_at)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
            None => py.None(),
        },
        Reply::Int(n) => n.into_pyobject(py)?.into_any().unbind(),
        Reply::Positions(ps) => PyList::new(py, ps)?.into_any().unbind(),
        Reply::Unit => py.None(),
        Reply::Table(rows) => {
            let items = rows
                .into_iter()
                .map(|r| {
                    let cells = r
                        .into_iter()
                        .map(|v| value_to_py(py, v))
                        .collect::<PyResult<Vec<_>>>()?;
                    PyTuple::new(py, cells)
                })
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        Reply::Requeued(rows) => PyList::new(py, rows)?.into_any().unbind(),
        Reply::Saga(positions) => match positions {
            Some(ps) => PyList::new(py, ps)?.into_any().unbind(),
            None => py.None(),
        },
        Reply::Dead(ds) => {
            let items = ds
                .into_iter()
                .map(|d| dead_to_py(py, d))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
    })
}
