//! `datetime`, `date` and `time` as ISO 8601, exactly as `isoformat()` writes them.

use std::fmt::Write as _;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{
    PyDate, PyDateAccess, PyDateTime, PyDelta, PyDeltaAccess, PyString, PyTimeAccess, PyTzInfo,
    PyTzInfoAccess,
};

use super::failure::Res;
use super::Encoder;

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

impl Encoder {
    /// ISO 8601 as `isoformat()` writes it. Exact `datetime` and `date` are written from their
    /// fields (an aware datetime asks its tzinfo for the offset, except for `timezone.utc`);
    /// `time` and subclasses call their own `isoformat()`.
    #[inline(never)]
    pub(super) fn datetime(&mut self, obj: &Bound<'_, PyAny>) -> Res {
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
}

pub(super) fn write_date(out: &mut String, year: i32, month: u8, day: u8) {
    let _ = write!(out, "{year:04}-{month:02}-{day:02}");
}

/// A UTC offset in microseconds as `isoformat()` writes it: `+HH:MM`, then `:SS` and
/// `.ffffff` only when non-zero.
pub(super) fn write_offset(out: &mut String, us: i64) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
