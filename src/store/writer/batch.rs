//! Applying one batch: the writes (appends, bus-log groups, saga changes) in one transaction,
//! each in a savepoint of its own, with the finished-delivery marks; then the reads.

use std::sync::Arc;

use super::{write_marks, write_ranges, Known, Op, Reply};
use crate::store::log::{Log, NewEvent};
use crate::store::saga::{self, SagaWrite};
use crate::store::{Result, StoreError};

/// Applies one batch: writes and finished-delivery marks in one transaction, then reads;
/// results in request order.
///
/// # Panics
///
/// Never: every request gets exactly one result.
pub fn apply(
    log: &mut Log,
    batch: Vec<(u64, Op)>,
    marks: &[(Arc<str>, i64)],
    known: &mut Known,
) -> Vec<(u64, Result<Reply>)> {
    let mut results: Vec<Option<Result<Reply>>> = Vec::with_capacity(batch.len());
    results.resize_with(batch.len(), || None);
    let (writes, reads): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .enumerate()
        .partition(|(_, (_, op))| op.is_write());
    let tokens: Vec<u64> = {
        let mut t = vec![0; results.len()];
        for (i, (tok, _)) in writes.iter().chain(reads.iter()) {
            t[*i] = *tok;
        }
        t
    };
    if !writes.is_empty() || !marks.is_empty() {
        let path = log.path().to_owned();
        // Marks lost with a failed batch only mean a redelivery after a restart.
        match write_batch(log, &path, &writes, marks, known) {
            Ok(outcomes) => {
                for ((i, _), r) in writes.iter().zip(outcomes) {
                    results[*i] = Some(r);
                }
            }
            Err(e) => {
                known.clear();
                let msg = e.to_string();
                for (i, _) in &writes {
                    results[*i] = Some(Err(StoreError::Invalid(format!(
                        "the batch could not be committed: {msg}"
                    ))));
                }
            }
        }
    }
    for (i, (_, op)) in reads {
        results[i] = Some(read(log, op));
    }
    tokens
        .into_iter()
        .zip(results)
        .filter(|(t, _)| *t != 0)
        .map(|(t, r)| (t, r.expect("every request answered")))
        .collect()
}

/// Logs single events on their streams (no version check); returns their positions.
pub(crate) fn log_events(
    tx: &rusqlite::Connection,
    path: &str,
    items: &[(String, NewEvent)],
    known: &mut Known,
    recorded: &str,
) -> Result<Vec<i64>> {
    let mut positions = Vec::with_capacity(items.len());
    let mut stmt = Log::inserter(tx, path)?;
    for (stream, event) in items {
        let mut cached = true;
        loop {
            let version = match known.streams.get(stream) {
                Some(v) if cached => v + 1,
                _ => {
                    cached = false;
                    Log::version(tx, stream).map_err(|e| StoreError::Sqlite {
                        path: path.to_owned(),
                        source: e,
                    })? + 1
                }
            };
            if let Some(position) =
                Log::insert(&mut stmt, tx, path, stream, version, event, recorded)?
            {
                if known.streams.len() >= Known::MAX {
                    known.clear();
                }
                match known.streams.get_mut(stream) {
                    Some(v) => *v = version,
                    None => {
                        known.streams.insert(stream.clone(), version);
                    }
                }
                positions.push(position);
                break;
            }
            if !cached {
                // Taken although just read: only another writer inside our transaction could.
                return Err(StoreError::Concurrency {
                    stream: stream.clone(),
                    expected: version - 1,
                    actual: version,
                });
            }
            cached = false; // another process appended to the stream: read it again
        }
    }
    Ok(positions)
}

/// A saga change inside `tx`: the instance, then the events it publishes, then the progress
/// of the event that caused it. None when that event was applied already (the caller rolls
/// the savepoint back).
fn saga_change(
    tx: &rusqlite::Connection,
    path: &str,
    w: &SagaWrite,
    known: &mut Known,
    recorded: &str,
) -> Result<Option<Vec<i64>>> {
    let sqlite = |e| StoreError::Sqlite {
        path: path.to_owned(),
        source: e,
    };
    w.check()?;
    if !saga::write(tx, w).map_err(sqlite)? {
        return Ok(None);
    }
    let positions = log_events(tx, path, &w.events, known, recorded)?;
    if let Some((sub, position)) = &w.done {
        write_ranges(tx, &[(Arc::from(sub.as_str()), *position)], known).map_err(sqlite)?;
    }
    Ok(Some(positions))
}

fn write_batch(
    log: &mut Log,
    path: &str,
    writes: &[(usize, (u64, Op))],
    marks: &[(Arc<str>, i64)],
    known: &mut Known,
) -> Result<Vec<Result<Reply>>> {
    let recorded = crate::store::log::now_iso();
    let mut tx = log.begin()?;
    let mut out = Vec::with_capacity(writes.len());
    for (_, (_, op)) in writes {
        let sqlite = |e| StoreError::Sqlite {
            path: path.to_owned(),
            source: e,
        };
        let r = match op {
            Op::Append {
                stream,
                events,
                expected,
            } => {
                known.streams.remove(stream);
                let sp = tx.savepoint().map_err(sqlite)?;
                match Log::append(&sp, path, stream, events, *expected) {
                    Ok((version, first_position)) => {
                        sp.commit().map_err(sqlite)?;
                        Ok(Reply::Appended {
                            version,
                            first_position,
                        })
                    }
                    Err(e) => Err(e), // the savepoint rolls back on drop
                }
            }
            Op::Log { items } => {
                let sp = tx.savepoint().map_err(sqlite)?;
                match log_events(&sp, path, items, known, &recorded) {
                    Ok(positions) => {
                        sp.commit().map_err(sqlite)?;
                        Ok(Reply::Positions(positions))
                    }
                    Err(e) => {
                        known.clear(); // it may hold versions the rollback undoes
                        Err(e)
                    }
                }
            }
            Op::Saga(w) => {
                let sp = tx.savepoint().map_err(sqlite)?;
                match saga_change(&sp, path, w, known, &recorded) {
                    Ok(Some(positions)) => {
                        sp.commit().map_err(sqlite)?;
                        Ok(Reply::Saga(Some(positions)))
                    }
                    Ok(None) => Ok(Reply::Saga(None)), // the savepoint rolls back on drop
                    Err(e) => {
                        known.clear(); // it may hold versions and ranges the rollback undoes
                        Err(e)
                    }
                }
            }
            _ => unreachable!("only writes reach write_batch"),
        };
        out.push(r);
    }
    write_marks(&tx, marks, known).map_err(|e| StoreError::Sqlite {
        path: path.to_owned(),
        source: e,
    })?;
    tx.commit().map_err(|e| StoreError::Sqlite {
        path: path.to_owned(),
        source: e,
    })?;
    Ok(out)
}

fn read(log: &Log, op: Op) -> Result<Reply> {
    match op {
        Op::Read {
            stream,
            after_version,
        } => log.read(&stream, after_version).map(Reply::Rows),
        Op::ReadAll {
            after_position,
            limit,
        } => log.read_all(after_position, limit).map(Reply::Rows),
        Op::SaveSnapshot {
            stream,
            version,
            state,
        } => log
            .save_snapshot(&stream, version, &state)
            .map(|()| Reply::Unit),
        Op::LoadSnapshot { stream } => log.load_snapshot(&stream).map(Reply::Snapshot),
        Op::Register {
            name,
            from_beginning,
        } => log
            .register_subscription(&name, from_beginning)
            .map(Reply::Int),
        Op::Undelivered {
            subscription,
            start_after,
        } => log.undelivered(&subscription, start_after).map(Reply::Rows),
        Op::AddDeadLetter(d) => log.add_dead_letter(&d).map(Reply::Int),
        Op::DeadLetters => log.dead_letters().map(Reply::Dead),
        Op::RemoveDeadLetters(ids) => log
            .remove_dead_letters(ids.as_deref())
            .map(|n| Reply::Int(i64::try_from(n).unwrap_or(i64::MAX))),
        Op::At(p) => log.at(p).map(Reply::Row),
        Op::Query { sql, params } => log.query(&sql, &params).map(Reply::Table),
        Op::Requeue(ids) => log
            .requeue_dead_letters(ids.as_deref())
            .map(Reply::Requeued),
        Op::Confirm(positions) => Ok(Reply::Positions(positions)),
        Op::Append { .. } | Op::Log { .. } | Op::Saga(_) => {
            unreachable!("writes go through write_batch")
        }
    }
}
