//! A cache of the Python `str`s of object keys, which repeat from one event to the next (the
//! shape of jiter's string cache). A cached key costs a hash and a compare instead of an
//! allocation and a UTF-8 decode, and the dict reuses the `str`'s cached hash.
//!
//! One decoding holds the cache for its whole run (`try_lock`: a decoding that finds it held,
//! by a `__del__` decoding inside another or another thread, runs without it, never waits).
//! Only `str`s are dropped while it is held, which run no Python code.

use std::hash::BuildHasher;

use parking_lot::{Mutex, MutexGuard};
use pyo3::prelude::*;
use pyo3::types::PyString;
use rustc_hash::FxBuildHasher;

/// Slots of the cache (a power of two); a key takes the slot of its hash, replacing any other.
const SLOTS: usize = 4096;

/// Keys longer than this (in bytes) are not cached.
const MAX_LEN: usize = 64;

static CACHE: Mutex<Keys> = Mutex::new(Keys { slots: Vec::new() });

/// The cache's slots, each the hash and the `str` of one key.
pub struct Keys {
    slots: Vec<Option<(u64, Py<PyString>)>>,
}

/// The cache, unless another decoding holds it.
pub fn take() -> Option<MutexGuard<'static, Keys>> {
    CACHE.try_lock()
}

impl Keys {
    /// The `str` of `key`: the cached one, or a new one that is cached.
    pub fn get<'py>(&mut self, py: Python<'py>, key: &str) -> Bound<'py, PyString> {
        if key.len() > MAX_LEN {
            return PyString::new(py, key);
        }
        if self.slots.is_empty() {
            self.slots.resize_with(SLOTS, || None);
        }
        let hash = FxBuildHasher.hash_one(key.as_bytes());
        // `SLOTS` is a power of two: the low bits of the hash pick the slot.
        #[allow(clippy::cast_possible_truncation)]
        let slot = &mut self.slots[hash as usize & (SLOTS - 1)];
        if let Some((h, s)) = slot {
            let s = s.bind(py);
            if *h == hash && s.to_str().is_ok_and(|t| t == key) {
                return s.clone();
            }
        }
        let s = PyString::new(py, key);
        *slot = Some((hash, s.clone().unbind()));
        s
    }
}
