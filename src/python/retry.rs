//! `RetryPolicy`: the engine's retry policy from Python.

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::core::retry::RetryPolicy;
use crate::python::errors::{self, to_py};

/// A retry policy (see `oxbus.RetryPolicy`).
#[pyclass(frozen, name = "RetryPolicy", module = "oxbus._oxbus")]
pub struct PyRetryPolicy {
    pub policy: RetryPolicy,
    /// The exception classes worth a retry, as a tuple.
    pub retry_on: Py<PyTuple>,
}

#[pymethods]
impl PyRetryPolicy {
    #[new]
    #[pyo3(signature = (max_attempts=1, base_delay=0.1, max_delay=30.0, multiplier=2.0, jitter=0.1, retry_on=None))]
    fn new(
        py: Python<'_>,
        max_attempts: i64,
        base_delay: f64,
        max_delay: f64,
        multiplier: f64,
        jitter: f64,
        retry_on: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let policy = RetryPolicy::new(max_attempts, base_delay, max_delay, multiplier, jitter)
            .map_err(|e| to_py(&e))?;
        let exc = py.get_type::<pyo3::exceptions::PyException>();
        let retry_on = match retry_on {
            None => PyTuple::new(py, [exc])?,
            Some(t) => {
                let items: Vec<Bound<'_, PyAny>> = match t.cast::<PyTuple>() {
                    Ok(tup) => tup.iter().collect(),
                    Err(_) => vec![t.clone()],
                };
                let base = py.get_type::<pyo3::exceptions::PyBaseException>();
                for it in &items {
                    let ok = it
                        .cast::<pyo3::types::PyType>()
                        .is_ok_and(|ty| ty.is_subclass(&base).unwrap_or(false));
                    if !ok {
                        return Err(errors::invalid_setting(
                            "retry_on",
                            "an exception class or a tuple of them",
                            &it.repr()?,
                        ));
                    }
                }
                PyTuple::new(py, items)?
            }
        };
        Ok(Self {
            policy,
            retry_on: retry_on.unbind(),
        })
    }

    /// The exception classes worth a retry.
    #[getter]
    fn retry_on(&self, py: Python<'_>) -> Py<PyTuple> {
        self.retry_on.clone_ref(py)
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        match other.cast::<Self>() {
            Ok(o) => Ok(o.get().policy == self.policy
                && o.get().retry_on.bind(py).eq(self.retry_on.bind(py))?),
            Err(_) => Ok(false),
        }
    }

    #[getter]
    fn max_attempts(&self) -> u32 {
        self.policy.max_attempts
    }
    #[getter]
    fn base_delay(&self) -> f64 {
        self.policy.base_delay
    }
    #[getter]
    fn max_delay(&self) -> f64 {
        self.policy.max_delay
    }
    #[getter]
    fn multiplier(&self) -> f64 {
        self.policy.multiplier
    }
    #[getter]
    fn jitter(&self) -> f64 {
        self.policy.jitter
    }

    /// Seconds before retry `n` (1-based), jitter included.
    fn delay(&self, n: u32) -> f64 {
        self.policy.delay(n, fastrand::f64())
    }

    fn __repr__(&self) -> String {
        let p = &self.policy;
        format!(
            "RetryPolicy(max_attempts={}, base_delay={}, max_delay={}, multiplier={}, jitter={}, retry_on={})",
            p.max_attempts, p.base_delay, p.max_delay, p.multiplier, p.jitter,
            Python::attach(|py| self.retry_on.bind(py).repr().map(|r| r.to_string()).unwrap_or_default())
        )
    }
}
