//! The writer thread's loop: takes a batch of queued messages, applies it under the core's
//! lock and hands the results to the sink; a large bus-log group is written part by part.

use std::collections::VecDeque;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;

use super::{apply, log_events, Core, Known, Marks, Msg, Reply, Sink, WalGuard, MAX_BATCH};
use crate::store::log::{Log, NewEvent};
use crate::store::{Result, StoreError};

#[allow(clippy::too_many_lines)] // one loop: take a batch, apply it, answer it
pub(super) fn run(core: &Mutex<Option<Core>>, rx: &Receiver<Msg>, sink: &dyn Sink, marks: &Marks) {
    let path = core
        .lock()
        .as_ref()
        .map(|c| c.log.path().to_owned())
        .unwrap_or_default();
    let mut closing = false;
    // Messages that arrived while a large log group held the transaction.
    let mut deferred: VecDeque<Msg> = VecDeque::new();
    while !closing {
        // A `Wake` only says marks wait: they are committed with the first batch after they
        // waited half of `MARKS_LINGER`, or alone once they waited all of it (`Msg::Wake`
        // below), so an idle bus records its progress once per linger, not per event.
        let first = match deferred.pop_front() {
            Some(Msg::Wake) => continue,
            Some(m) => m,
            None => {
                let got = match marks.due_at() {
                    Some(at) => rx.recv_deadline(at),
                    None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                };
                match got {
                    Ok(Msg::Wake) => continue,
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => Msg::Wake,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        let every_mark = matches!(first, Msg::Wake);
        let mut batch = Vec::new();
        match first {
            Msg::Close => closing = true,
            Msg::Op(t, op) => batch.push((t, op)),
            Msg::Ops(ops) => batch.extend(ops),
            Msg::LogPart(group, items) => {
                if let Some(results) = run_group(core, rx, &mut deferred, group, &items) {
                    sink.deliver(results);
                }
                continue;
            }
            // The end of a group whose parts were not seen: never sent so, refused if it is.
            Msg::LogEnd(_, token, _) => {
                sink.deliver(vec![(token, Err(orphan()))]);
                continue;
            }
            Msg::LogAbort(_) => continue,
            Msg::Wake => {} // marks due: committed alone, or with what is queued meanwhile
        }
        while !closing && batch.len() < MAX_BATCH {
            let m = match deferred.pop_front() {
                Some(m) => m,
                None => match rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match m {
                Msg::Op(t, op) => batch.push((t, op)),
                Msg::Ops(ops) => batch.extend(ops),
                Msg::Wake | Msg::LogAbort(_) => {}
                Msg::LogEnd(_, token, _) => sink.deliver(vec![(token, Err(orphan()))]),
                Msg::Close => closing = true,
                part @ Msg::LogPart(..) => {
                    // A large group takes the transaction alone, after this batch.
                    deferred.push_front(part);
                    break;
                }
            }
        }
        let mut c = core.lock();
        let Some(Core { log, known, guard }) = &mut *c else {
            break;
        };
        let mut marked = if every_mark || closing {
            marks.take_all(&mut known.new_types)
        } else {
            marks.take_due(&mut known.new_types)
        };
        let mut refused = Vec::new();
        if guard.detached {
            // The file is no longer safe to write from here: only reads are answered.
            marked.clear();
            let (reads, writes): (Vec<_>, Vec<_>) =
                batch.into_iter().partition(|(_, op)| op.only_reads());
            batch = reads;
            refused = writes
                .into_iter()
                .filter(|(t, _)| *t != 0)
                .map(|(t, _)| (t, Err(WalGuard::error(log))))
                .collect();
        }
        let mut results = apply(log, batch, &marked, known);
        results = guard.vet(log, results);
        drop(c);
        results.extend(refused);
        if !results.is_empty() {
            sink.deliver(results);
        }
        // After the results: they never wait for it. Under the core's lock, so no commit on
        // the asyncio thread (`log_now`, which only ever tries the lock) lands meanwhile.
        if let Some(c) = &*core.lock() {
            c.log.checkpoint_if_overdue();
        }
    }
    // Requests still queued after Close are refused, not silently dropped.
    let rest: Vec<(u64, Result<Reply>)> = deferred
        .into_iter()
        .chain(rx.try_iter())
        .flat_map(|m| match m {
            Msg::Op(t, _) | Msg::LogEnd(_, t, _) => vec![t],
            Msg::Ops(ops) => ops.into_iter().map(|(t, _)| t).collect(),
            Msg::Wake | Msg::Close | Msg::LogPart(..) | Msg::LogAbort(_) => Vec::new(),
        })
        .filter(|t| *t != 0)
        .map(|t| (t, Err(StoreError::Closed(path.clone()))))
        .collect();
    if !rest.is_empty() {
        sink.deliver(rest);
    }
    // The connection closes here (and with it the checkpoint thread's wake-up channel).
    drop(core.lock().take());
}

/// A large log group (see `log_group`), holding the core meanwhile; its vetted result.
fn run_group(
    core: &Mutex<Option<Core>>,
    rx: &Receiver<Msg>,
    deferred: &mut VecDeque<Msg>,
    group: u64,
    items: &[(String, NewEvent)],
) -> Option<Vec<(u64, Result<Reply>)>> {
    let mut c = core.lock();
    let Core { log, known, guard } = c.as_mut()?;
    let refuse = guard.detached;
    let result = log_group(log, rx, deferred, known, group, items, refuse)?;
    Some(guard.vet(log, vec![result]))
}

fn orphan() -> StoreError {
    StoreError::Invalid("the end of a log group arrived without its first part".to_owned())
}

/// Writes a large log group, part by part as its sender encodes them, in one transaction:
/// SQLite inserts the first parts while Python still encodes the last. Other messages wait in
/// `deferred` meanwhile. Returns the group's result (None when it was abandoned: the
/// transaction rolls back and nothing of it is written).
fn log_group(
    log: &mut Log,
    rx: &Receiver<Msg>,
    deferred: &mut VecDeque<Msg>,
    known: &mut Known,
    group: u64,
    items: &[(String, NewEvent)],
    refuse: bool,
) -> Option<(u64, Result<Reply>)> {
    let path = log.path().to_owned();
    let recorded = crate::store::log::now_iso();
    let mut positions = Vec::new();
    let (tx, mut failed) = if refuse {
        (None, Some(StoreError::Detached(path.clone())))
    } else {
        match log.begin() {
            Ok(tx) => (Some(tx), None),
            Err(e) => (None, Some(e)),
        }
    };
    let mut add = |items: &[(String, NewEvent)], failed: &mut Option<StoreError>| {
        if let (Some(tx), None) = (&tx, &*failed) {
            match log_events(tx, &path, items, known, &recorded) {
                Ok(p) => positions.extend(p),
                Err(e) => *failed = Some(e),
            }
        }
    };
    add(items, &mut failed);
    loop {
        // The sender always ends a group (a guard sends LogAbort even if it unwinds).
        let Ok(m) = rx.recv() else {
            known.clear();
            return None;
        };
        match m {
            Msg::LogPart(g, items) if g == group => add(&items, &mut failed),
            Msg::LogEnd(g, token, items) if g == group => {
                add(&items, &mut failed);
                let result = match (tx, failed) {
                    (Some(tx), None) => {
                        tx.commit()
                            .map(|()| Reply::Positions(positions))
                            .map_err(|e| StoreError::Sqlite {
                                path: path.clone(),
                                source: e,
                            })
                    }
                    (_, Some(e)) => Err(e),
                    (None, None) => unreachable!("no transaction means a failure"),
                };
                if result.is_err() {
                    known.clear();
                }
                return Some((token, result));
            }
            Msg::LogAbort(g) if g == group => {
                known.clear();
                return None;
            }
            other => deferred.push_back(other),
        }
    }
}
