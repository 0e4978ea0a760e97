//! Subscription progress as ranges of finished positions: loaded and merged from the file,
//! grown as deliveries finish or events are skipped, written back in the same transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Known;

/// A subscription's finished ranges from the file, merged (and written back merged when they
/// were not: files written before the writer kept them merged).
fn load_ranges(tx: &rusqlite::Connection, sub: &str) -> rusqlite::Result<BTreeMap<i64, i64>> {
    let stored: Vec<(i64, i64)> = tx
        .prepare_cached(
            "SELECT first, last FROM progress_ranges WHERE subscription = ?1 ORDER BY first",
        )?
        .query_map([sub], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut merged: BTreeMap<i64, i64> = BTreeMap::new();
    let mut prev: Option<(i64, i64)> = None;
    for (first, last) in stored.iter().copied() {
        match &mut prev {
            Some(p) if first <= p.1.saturating_add(1) => p.1 = p.1.max(last),
            _ => {
                if let Some((f, l)) = prev.replace((first, last)) {
                    merged.insert(f, l);
                }
            }
        }
    }
    if let Some((f, l)) = prev {
        merged.insert(f, l);
    }
    if merged.len() < stored.len() {
        tx.execute("DELETE FROM progress_ranges WHERE subscription = ?1", [sub])?;
        let mut ins = tx.prepare_cached(
            "INSERT INTO progress_ranges (subscription, first, last) VALUES (?1, ?2, ?3)",
        )?;
        for (f, l) in &merged {
            ins.execute(rusqlite::params![sub, f, l])?;
        }
    }
    Ok(merged)
}

/// Adds `first..=last` to a subscription's ranges, merging with its neighbours on both sides,
/// in memory and in the file. False when the file was not as `ranges` says (changed by
/// another connection, as `oxbus dlq retry` does): then nothing is changed in memory.
fn add_range(
    tx: &rusqlite::Connection,
    sub: &str,
    ranges: &mut BTreeMap<i64, i64>,
    first: i64,
    last: i64,
) -> rusqlite::Result<bool> {
    use std::ops::Bound::{Excluded, Included};
    let (mut new_first, mut new_last, mut grow) = (first, last, None);
    if let Some((&pf, &pl)) = ranges.range(..=first).next_back() {
        if pl >= last {
            return Ok(true); // already finished
        }
        if pl.saturating_add(1) >= first {
            (new_first, new_last, grow) = (pf, last, Some((pf, pl)));
        }
    }
    let swallowed: Vec<(i64, i64)> = ranges
        .range((Excluded(new_first), Included(last.saturating_add(1))))
        .map(|(f, l)| (*f, *l))
        .collect();
    for (f, l) in &swallowed {
        new_last = new_last.max(*l);
        let n = tx
            .prepare_cached(
                "DELETE FROM progress_ranges WHERE subscription = ?1 AND first = ?2 AND last = ?3",
            )?
            .execute(rusqlite::params![sub, f, l])?;
        if n != 1 {
            return Ok(false);
        }
    }
    let n = match grow {
        Some((pf, pl)) => tx
            .prepare_cached(
                "UPDATE progress_ranges SET last = ?4 WHERE subscription = ?1 AND first = ?2 AND last = ?3",
            )?
            .execute(rusqlite::params![sub, pf, pl, new_last])?,
        None => tx
            .prepare_cached(
                "INSERT INTO progress_ranges (subscription, first, last) VALUES (?1, ?2, ?3)
                 ON CONFLICT (subscription, first) DO NOTHING",
            )?
            .execute(rusqlite::params![sub, new_first, new_last])?,
    };
    if n != 1 {
        return Ok(false);
    }
    for (f, _) in &swallowed {
        ranges.remove(f);
    }
    ranges.insert(new_first, new_last);
    Ok(true)
}

/// Records finished deliveries (and skipped events) as ranges: sorted, runs of consecutive
/// positions of one subscription merged with the ranges before and after them, so a
/// subscription has one range per gap of unfinished events, not one per delivery. Records the
/// (subscription, type) pairs skipped for the first time.
pub(crate) fn write_marks(
    tx: &rusqlite::Connection,
    marks: &[(Arc<str>, i64)],
    known: &mut Known,
) -> rusqlite::Result<()> {
    if !known.new_types.is_empty() {
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO skipped_types (subscription, event_type) VALUES (?1, ?2)",
        )?;
        for pair in std::mem::take(&mut known.new_types) {
            if !known.types.contains(&pair) {
                ins.execute(rusqlite::params![&*pair.0, &*pair.1])?;
                known.types.insert(pair);
            }
        }
    }
    write_ranges(tx, marks, known)
}

/// Records finished deliveries as ranges (see `write_marks`).
pub(super) fn write_ranges(
    tx: &rusqlite::Connection,
    marks: &[(Arc<str>, i64)],
    known: &mut Known,
) -> rusqlite::Result<()> {
    if marks.is_empty() {
        return Ok(());
    }
    let mut sorted = marks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut i = 0;
    while i < sorted.len() {
        let (sub, first) = (&sorted[i].0, sorted[i].1);
        let mut last = first;
        i += 1;
        while i < sorted.len() && sorted[i].0 == *sub && sorted[i].1 == last + 1 {
            last += 1;
            i += 1;
        }
        if !known.ranges.contains_key(sub) {
            let loaded = load_ranges(tx, sub)?;
            known.ranges.insert(Arc::clone(sub), loaded);
        }
        let ranges = known.ranges.get_mut(sub).expect("just loaded");
        if !add_range(tx, sub, ranges, first, last)? {
            // Another connection changed them: read them again and add to what is there.
            *ranges = load_ranges(tx, sub)?;
            if !add_range(tx, sub, ranges, first, last)? {
                return Err(rusqlite::Error::QueryReturnedNoRows);
            }
        }
    }
    Ok(())
}
