//! The writer thread's loop: takes a batch of queued messages, applies it under the core's
//! lock and hands the results to the sink; a large bus-log group is written part by part.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

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
    let mut spin = Spin::default();
    while !closing {
        // A `Wake` only says marks wait: they are committed with the first batch after they
        // waited half of `MARKS_LINGER`, or alone once they waited all of it (`Msg::Wake`
        // below), so an idle bus records its progress once per linger, not per event.
        let first = match deferred.pop_front() {
            Some(Msg::Wake) => continue,
            Some(m) => m,
            None => {
                let got = if let Some(m) = spin.next(rx) {
                    Ok(m)
                } else {
                    let got = match marks.due_at() {
                        Some(at) => rx.recv_deadline(at),
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    spin.woke();
                    got
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
        let working = Instant::now();
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
            spin.answered(working.elapsed());
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

/// The longest the writer looks for the next request after answering a batch.
const SPIN: Duration = Duration::from_micros(500);

/// Whether, and how long, the writer looks for the next request before it sleeps. Publishers
/// whose commits were just answered usually send the next within a loop turn; looking for it
/// (yielding the CPU between looks) spares the writer the wake-up from a sleep, a futex wake
/// and a reschedule of tens of µs per commit here (`synchronous="full"`, 8 tasks: +9-16%, one
/// task +4-5%, `bench_durable.py`). It looks only while that pays (the last request came
/// within the look of the answer before it), and never longer than the answered batch took
/// to write (nor `SPIN`): looking costs at most as much CPU as the writing it speeds up, and
/// a bus with requests further apart, or idle, never spins.
#[derive(Default)]
struct Spin {
    /// When the last batch was answered (None once a request came after it).
    answered: Option<Instant>,
    /// How long to look after that answer: what the batch took to write, at most `SPIN`.
    window: Duration,
    /// The last request came within the look of the answer before it.
    pays: bool,
}

impl Spin {
    /// A batch that took `work` to write was answered.
    fn answered(&mut self, work: Duration) {
        self.answered = Some(Instant::now());
        self.window = work.min(SPIN);
    }

    /// The next request, when looking pays and it comes within the window; None (after
    /// looking or not) otherwise: the caller then sleeps on the channel.
    fn next(&mut self, rx: &Receiver<Msg>) -> Option<Msg> {
        let answered = self.answered.filter(|_| self.pays)?;
        loop {
            if let Ok(m) = rx.try_recv() {
                self.answered = None;
                return Some(m);
            }
            if answered.elapsed() >= self.window {
                self.pays = false;
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// The writer woke from a sleep on the channel: looking would have paid if that came
    /// within the window of the last answer.
    fn woke(&mut self) {
        if let Some(answered) = self.answered.take() {
            self.pays = answered.elapsed() < self.window;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_looks_for_the_next_request_only_while_that_pays() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut spin = Spin::default();
        // Nothing answered yet: no looking.
        assert!(spin.next(&rx).is_none());
        // Answered, and the next request came soon after, while the writer slept: looking
        // pays from now on.
        spin.answered(SPIN);
        tx.send(Msg::Wake).unwrap();
        assert!(spin.next(&rx).is_none(), "not before it is known to pay");
        assert!(matches!(rx.try_recv(), Ok(Msg::Wake))); // what the sleep would take
        spin.woke();
        assert!(spin.pays);
        // Answered again: the next request is taken without a sleep.
        spin.answered(SPIN);
        tx.send(Msg::Close).unwrap();
        assert!(matches!(spin.next(&rx), Some(Msg::Close)));
        assert!(spin.pays);
        // Answered, and nothing comes: it gives up after `SPIN` and stops looking.
        spin.answered(SPIN);
        let started = Instant::now();
        assert!(spin.next(&rx).is_none());
        assert!(started.elapsed() >= SPIN);
        assert!(!spin.pays);
        spin.answered(SPIN);
        assert!(spin.next(&rx).is_none(), "no looking once it did not pay");
        // A batch written quickly is looked after only as long as it took.
        spin.pays = true;
        spin.answered(Duration::from_micros(20));
        assert_eq!(spin.window, Duration::from_micros(20));
        assert!(spin.next(&rx).is_none());
        assert!(!spin.pays);
        spin.answered(SPIN * 4);
        assert_eq!(spin.window, SPIN, "never longer than SPIN");
        // A request long after the answer keeps it off.
        std::thread::sleep(SPIN * 2);
        tx.send(Msg::Wake).unwrap();
        spin.woke();
        assert!(!spin.pays);
    }
}
