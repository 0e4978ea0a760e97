//! The writer thread: owns the connection, applies requests in batches.
//!
//! Requests queue on a channel. The thread takes everything queued (up to `MAX_BATCH`), runs
//! all writes of the batch in one transaction — each append in a savepoint of its own, so one
//! conflict fails one request, not the batch — commits once (group commit: many publishers
//! share one fsync), then runs the reads and hands every result to the `Sink` in one call. The
//! Python glue turns that call into one wake-up of the asyncio loop per batch.
//!
//! Here: the requests and replies, the handle and its thread's shared state. The thread's loop
//! is in `thread`, a batch's transaction in `batch`, subscription progress in `ranges`, the
//! WAL watch in `wal`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Sender};
use parking_lot::Mutex;

use rusqlite::types::Value;

use crate::store::log::{DeadRow, Log, NewEvent, Snapshot, StoredRow, Synchronous};
use crate::store::saga::SagaWrite;
use crate::store::{Result, StoreError};

mod batch;
mod ranges;
mod thread;
mod wal;

pub use batch::apply;
pub(crate) use batch::log_events;
pub(crate) use ranges::write_marks;
use ranges::write_ranges;
use thread::run;
pub(crate) use wal::WalGuard;

/// Requests taken into one batch at most.
pub const MAX_BATCH: usize = 4096;

/// How long finished-delivery marks wait for company before they are committed alone.
const MARKS_LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// What the writer can do.
#[derive(Debug)]
pub enum Op {
    /// Appends to one stream, atomically, optionally guarded by the expected version.
    Append {
        /// The stream.
        stream: String,
        /// Encoded events.
        events: Vec<NewEvent>,
        /// The stream's version before the append (0 = new), or None for no check.
        expected: Option<i64>,
    },
    /// Appends single events to several streams (the bus's log), atomically as a group, with
    /// no version check; replies with each event's position.
    Log {
        /// (stream, event) pairs, in publish order.
        items: Vec<(String, NewEvent)>,
    },
    /// Reads a stream after a version.
    Read {
        /// The stream.
        stream: String,
        /// Exclusive lower bound.
        after_version: i64,
    },
    /// Reads the log after a position.
    ReadAll {
        /// Exclusive lower bound.
        after_position: i64,
        /// At most this many rows.
        limit: i64,
    },
    /// Saves a snapshot.
    SaveSnapshot {
        /// The stream.
        stream: String,
        /// The version it reflects.
        version: i64,
        /// JSON state.
        state: String,
    },
    /// Loads a snapshot.
    LoadSnapshot {
        /// The stream.
        stream: String,
    },
    /// Registers a durable subscription (returns where it starts after).
    Register {
        /// Subscription name.
        name: String,
        /// Start at position 0 instead of the head.
        from_beginning: bool,
    },
    /// Committed events a subscription has not finished.
    Undelivered {
        /// Subscription name.
        subscription: String,
        /// Where it started.
        start_after: i64,
    },
    /// Adds a dead letter.
    AddDeadLetter(DeadRow),
    /// Lists dead letters.
    DeadLetters,
    /// Removes dead letters (all with None).
    RemoveDeadLetters(Option<Vec<i64>>),
    /// The row at a position.
    At(i64),
    /// One read-only SQL statement with its parameters (the admin tools' counts).
    Query {
        /// The statement.
        sql: String,
        /// Its parameters, in order.
        params: Vec<Value>,
    },
    /// Re-queues dead letters (all with None) for the next start.
    Requeue(Option<Vec<i64>>),
    /// Changes a saga instance; its events are logged and its progress mark recorded in the
    /// same savepoint (replies with the events' positions, or `Saga(None)` when the event was
    /// applied to the instance already: then nothing is written).
    Saga(Box<SagaWrite>),
    /// Positions committed on another thread while the WAL was being replaced
    /// (`Logged::Unconfirmed`): answered with the same positions once this thread has checked
    /// the WAL (and saved it), or with the error that says it could not.
    Confirm(Vec<i64>),
}

impl Op {
    fn is_write(&self) -> bool {
        matches!(self, Self::Append { .. } | Self::Log { .. } | Self::Saga(_))
    }

    /// Whether it only reads (allowed on a store whose WAL was taken from under it).
    fn only_reads(&self) -> bool {
        matches!(
            self,
            Self::Read { .. }
                | Self::ReadAll { .. }
                | Self::LoadSnapshot { .. }
                | Self::DeadLetters
                | Self::At(_)
                | Self::Query { .. }
                | Self::Undelivered { .. }
        )
    }
}

/// What a request produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The stream's new version and the position of the first appended event.
    Appended {
        /// New stream version.
        version: i64,
        /// Position of the first event appended.
        first_position: i64,
    },
    /// Positions of logged events, in order.
    Positions(Vec<i64>),
    /// Rows of the log.
    Rows(Vec<StoredRow>),
    /// A snapshot, if any.
    Snapshot(Option<Snapshot>),
    /// A number (a position, a count, an id).
    Int(i64),
    /// Nothing.
    Unit,
    /// Dead letters.
    Dead(Vec<DeadRow>),
    /// One row, if any.
    Row(Option<StoredRow>),
    /// The rows of a query.
    Table(Vec<Vec<Value>>),
    /// Re-queued dead letters: (id, subscription, position).
    Requeued(Vec<(i64, String, i64)>),
    /// A saga change: the positions of the events it logged, or None when it was applied
    /// already (nothing written).
    Saga(Option<Vec<i64>>),
}

/// Receives results, a whole batch per call, on the writer thread.
pub trait Sink: Send + Sync + 'static {
    /// `results` pairs each request's token with its outcome. Token 0 requests are not
    /// reported.
    fn deliver(&self, results: Vec<(u64, Result<Reply>)>);
}

enum Msg {
    Op(u64, Op),
    Ops(Vec<(u64, Op)>),
    /// Finished deliveries are waiting in `Marks`.
    Wake,
    /// A part of a large bus-log group (group id, events); more parts follow, then
    /// `LogEnd` or `LogAbort` with the same id.
    LogPart(u64, Vec<(String, NewEvent)>),
    /// The last part of a group: it commits, and `token` gets every position.
    LogEnd(u64, u64, Vec<(String, NewEvent)>),
    /// The group is abandoned: nothing of it is written.
    LogAbort(u64),
    Close,
}

/// An event the bus routed to none of `subs`: (position, its type key, those subscriptions).
type Skip = (i64, Arc<str>, Arc<[Arc<str>]>);

/// Finished deliveries, `(subscription, position)`, and skipped events waiting for the next
/// transaction. Workers and the bus push here without a request, a future or the GIL. The
/// writer is woken once for them (`woken`) and commits them alone once the oldest waited
/// `MARKS_LINGER`; any commit (the writer's batches, `Writer::log_now` on the asyncio thread)
/// takes them once they waited half as long. So a bus writes its progress a few hundred times
/// a second at most, not with every event (a page more per commit: at synchronous=FULL, more
/// to sync), and the writer thread is not woken per event to commit marks of its own.
#[derive(Default)]
pub(crate) struct Marks {
    waiting: Mutex<Waiting>,
    /// A `Wake` was sent that the writer has not taken the marks for yet: pushes send no other.
    woken: AtomicBool,
}

/// Finished deliveries and skipped events, and when the oldest of them came.
#[derive(Default)]
struct Waiting {
    done: Vec<(Arc<str>, i64)>,
    skips: Vec<Skip>,
    since: Option<std::time::Instant>,
}

impl Marks {
    /// Everything waiting, skips turned into marks; the (subscription, type) pairs skipped go
    /// to `types`.
    pub(crate) fn take(&self, types: &mut Vec<(Arc<str>, Arc<str>)>) -> Vec<(Arc<str>, i64)> {
        Self::marks_of(std::mem::take(&mut *self.waiting.lock()), types)
    }

    /// Finished deliveries and skips as marks (see `take`).
    fn marks_of(waiting: Waiting, types: &mut Vec<(Arc<str>, Arc<str>)>) -> Vec<(Arc<str>, i64)> {
        let Waiting {
            mut done, skips, ..
        } = waiting;
        for (position, event_type, subs) in skips {
            for sub in subs.iter() {
                done.push((Arc::clone(sub), position));
                types.push((Arc::clone(sub), Arc::clone(&event_type)));
            }
        }
        done
    }

    /// What the writer thread commits with its batch: everything; later pushes wake it again.
    fn take_all(&self, types: &mut Vec<(Arc<str>, Arc<str>)>) -> Vec<(Arc<str>, i64)> {
        self.woken.store(false, SeqCst);
        self.take(types)
    }

    /// Everything waiting once the oldest has waited half of `MARKS_LINGER`, else nothing:
    /// the asyncio thread's commits take the marks before the writer's linger ends.
    pub(crate) fn take_due(&self, types: &mut Vec<(Arc<str>, Arc<str>)>) -> Vec<(Arc<str>, i64)> {
        let waiting = {
            let mut m = self.waiting.lock();
            if !m.since.is_some_and(|t| t.elapsed() >= MARKS_LINGER / 2) {
                return Vec::new();
            }
            std::mem::take(&mut *m)
        };
        Self::marks_of(waiting, types)
    }

    /// When the writer thread commits what waits by itself: once the oldest mark has waited
    /// all of `MARKS_LINGER`. None when nothing waits, and then the next push wakes the writer
    /// (the flag is cleared under the lock a push takes first, so no push is missed).
    pub(super) fn due_at(&self) -> Option<std::time::Instant> {
        let m = self.waiting.lock();
        if m.since.is_none() {
            self.woken.store(false, SeqCst);
        }
        m.since.map(|t| t + MARKS_LINGER)
    }

    /// Adds with `f`; true when the writer must be woken (no `Wake` on its way).
    fn push(&self, f: impl FnOnce(&mut Waiting)) -> bool {
        {
            let mut m = self.waiting.lock();
            if m.since.is_none() {
                m.since = Some(std::time::Instant::now());
            }
            f(&mut m);
        }
        // A read first: while a wake is on its way (the common case) the flag is not written.
        !self.woken.load(SeqCst) && !self.woken.swap(true, SeqCst)
    }

    /// Puts back marks taken for a transaction that did not commit: the writer commits them
    /// with its next one.
    pub(crate) fn restore(&self, marks: Vec<(Arc<str>, i64)>) {
        let mut m = self.waiting.lock();
        m.since.get_or_insert_with(std::time::Instant::now);
        m.done.extend(marks);
    }
}

/// What the writer thread works with, behind one lock: the thread holds it while it applies a
/// batch (or a large log group) and leaves it free between batches, when the asyncio thread
/// may commit small bus-log groups itself (`Writer::log_now`).
pub(crate) struct Core {
    pub(crate) log: Log,
    pub(crate) known: Known,
    pub(crate) guard: WalGuard,
}

/// A handle on the writer thread.
pub struct Writer {
    /// None once the thread has ended (the connection is then closed).
    pub(crate) core: Arc<Mutex<Option<Core>>>,
    /// Commits do not fsync (WAL with synchronous=NORMAL, or an in-memory database).
    pub(crate) no_fsync: bool,
    tx: Sender<Msg>,
    handle: Mutex<Option<JoinHandle<()>>>,
    /// Runs WAL checkpoints off the writer thread (file databases only).
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    path: String,
    pub(crate) marks: Arc<Marks>,
    groups: std::sync::atomic::AtomicU64,
}

/// WAL pages after which the checkpoint thread is woken (SQLite's own default threshold).
const CHECKPOINT_AT: i32 = 1000;
/// WAL pages after which the checkpoint thread also restarts the WAL (a RESTART pass holds the
/// write lock through an fsync: commits wait ~2 ms). Below, its passes copy without blocking.
const RESTART_AT: i32 = 4_000;
/// WAL pages after which the writer checkpoints itself, blocking its commits until the WAL can
/// start over (the other thread fell behind: a loaded machine starved it). 8,000 pages of
/// 4 KiB: the WAL stays under ~32 MB whatever the load.
const CHECKPOINT_INLINE: i32 = 8_000;

use crate::store::log::in_memory;

/// When the checkpoint thread is woken: once the WAL holds `next` pages, and then not again
/// until it has grown by another `CHECKPOINT_AT` (or started over). Without the step, every
/// commit past `CHECKPOINT_AT` woke it: while a writer keeps committing, a passive pass never
/// copies the whole WAL (frames arrive meanwhile), so the WAL cannot start over, and the
/// thread ran pass after pass, each with its syncs of the WAL and the database file, until
/// `RESTART_AT` (at synchronous=FULL, two syncs of its own per commit of the writer's).
/// Returns the threshold after a commit left the WAL at `pages` (`wake` is called when it is
/// reached, and says whether the thread took the wake-up).
fn next_wake(next: i32, pages: i32, wake: impl FnOnce() -> bool) -> i32 {
    // Below the last wake-up's level, the WAL started over since.
    let next = if pages < next - CHECKPOINT_AT {
        CHECKPOINT_AT
    } else {
        next
    };
    if pages >= next && wake() {
        pages + CHECKPOINT_AT
    } else {
        next
    }
}

/// A bus-log group sent in parts as it is encoded, written in one transaction: the writer
/// inserts the first parts while the sender encodes the rest. `end` commits it; dropping it
/// before `end` (an encoding error, a panic) abandons it, and nothing of it is written.
pub struct LogGroup<'a> {
    writer: &'a Writer,
    id: u64,
    started: bool,
    ended: bool,
}

impl LogGroup<'_> {
    /// Sends a part; more follow.
    pub fn part(&mut self, items: Vec<(String, NewEvent)>) -> Result<()> {
        self.started = true;
        self.writer.send(Msg::LogPart(self.id, items))
    }

    /// Whether a part was sent (a group that sent none is better sent as one `Log` request).
    pub fn started(&self) -> bool {
        self.started
    }

    /// Sends the last part; `token` gets every position of the group.
    pub fn end(mut self, token: u64, items: Vec<(String, NewEvent)>) -> Result<()> {
        self.ended = true;
        if self.started {
            self.writer.send(Msg::LogEnd(self.id, token, items))
        } else {
            self.writer.submit(token, Op::Log { items })
        }
    }
}

impl Drop for LogGroup<'_> {
    fn drop(&mut self) {
        if self.started && !self.ended {
            let _ = self.writer.send(Msg::LogAbort(self.id));
        }
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Opens the log (errors are reported here, at once) and starts its thread.
    pub fn open(path: &str, sync: Synchronous, sink: Arc<dyn Sink>) -> Result<Self> {
        let no_fsync = sync == Synchronous::Normal || in_memory(path);
        let mut log = Log::open(path, sync)?;
        let checkpointer = if in_memory(path) {
            None
        } else {
            let (wake, wakes) = crossbeam_channel::bounded::<i32>(1);
            let ckpt = Log::open(path, sync)?;
            let handle = std::thread::Builder::new()
                .name("oxbus-checkpoint".into())
                .spawn(move || {
                    // Ends when the writer's connection (and with it `wake`) is gone.
                    while let Ok(pages) = wakes.recv() {
                        // The long copy without blocking the writer; past `RESTART_AT` pages,
                        // then a short blocking pass over what it committed meanwhile, so the
                        // WAL can start over.
                        let modes: &[&str] = if pages >= RESTART_AT {
                            &["PASSIVE", "RESTART"]
                        } else {
                            &["PASSIVE"]
                        };
                        for mode in modes {
                            let _ = ckpt.conn().query_row(
                                &format!("PRAGMA wal_checkpoint({mode})"),
                                [],
                                |_| Ok(()),
                            );
                        }
                    }
                })
                .map_err(|e| {
                    StoreError::Invalid(format!("cannot start the SQLite checkpoint thread: {e}"))
                })?;
            let mut next = CHECKPOINT_AT;
            log.delegate_checkpoints(CHECKPOINT_INLINE, move |pages| {
                next = next_wake(next, pages, || wake.try_send(pages).is_ok());
            })?;
            Some(handle)
        };
        Self::start(log, checkpointer, sink, true, no_fsync)
    }

    /// Opens an existing log for reading only (see `Log::open_read_only`) and starts its
    /// thread: reads are answered, writes fail with SQLite's read-only error.
    pub fn open_read_only(path: &str, sink: Arc<dyn Sink>) -> Result<Self> {
        Self::start(Log::open_read_only(path)?, None, sink, false, false)
    }

    fn start(
        log: Log,
        checkpointer: Option<JoinHandle<()>>,
        sink: Arc<dyn Sink>,
        watch: bool,
        no_fsync: bool,
    ) -> Result<Self> {
        let path = log.path().to_owned();
        let (tx, rx) = unbounded();
        let marks = Arc::new(Marks::default());
        let thread_marks = Arc::clone(&marks);
        let guard = WalGuard::new(&log, watch);
        let core = Arc::new(Mutex::new(Some(Core {
            log,
            known: Known::default(),
            guard,
        })));
        let thread_core = Arc::clone(&core);
        let handle = std::thread::Builder::new()
            .name("oxbus-sqlite".into())
            .spawn(move || run(&thread_core, &rx, &*sink, &thread_marks))
            .map_err(|e| StoreError::Invalid(format!("cannot start the SQLite thread: {e}")))?;
        Ok(Self {
            core,
            no_fsync,
            tx,
            handle: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(checkpointer),
            path,
            marks,
            groups: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Records that `subscription` finished the event at `position`: committed with the next
    /// transaction (at the latest when the writer closes), never answered.
    pub fn mark_done(&self, subscription: Arc<str>, position: i64) -> Result<()> {
        if self.marks.push(|m| m.done.push((subscription, position))) {
            self.wake()?;
        }
        Ok(())
    }

    /// Records that the event at `position` (of type `event_type`) is none of `subs`'
    /// business (the bus routed it to none of them): their progress moves past it, so it stays
    /// one range per run of finished positions, whatever types they take from the traffic.
    pub fn skip(&self, position: i64, event_type: Arc<str>, subs: Arc<[Arc<str>]>) -> Result<()> {
        if subs.is_empty() {
            return Ok(());
        }
        if self
            .marks
            .push(|m| m.skips.push((position, event_type, subs)))
        {
            self.wake()?;
        }
        Ok(())
    }

    fn wake(&self) -> Result<()> {
        self.tx
            .send(Msg::Wake)
            .map_err(|_| StoreError::Closed(self.path.clone()))
    }

    /// Queues a request; its result reaches the sink with `token` (0 = not reported).
    pub fn submit(&self, token: u64, op: Op) -> Result<()> {
        self.tx
            .send(Msg::Op(token, op))
            .map_err(|_| StoreError::Closed(self.path.clone()))
    }

    /// Queues several requests at once (one wake-up of the thread).
    pub fn submit_many(&self, ops: Vec<(u64, Op)>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Msg::Ops(ops))
            .map_err(|_| StoreError::Closed(self.path.clone()))
    }

    /// Starts sending a large bus-log group in parts (see `LogGroup`).
    pub fn log_group(&self) -> LogGroup<'_> {
        LogGroup {
            writer: self,
            id: self
                .groups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            started: false,
            ended: false,
        }
    }

    fn send(&self, m: Msg) -> Result<()> {
        self.tx
            .send(m)
            .map_err(|_| StoreError::Closed(self.path.clone()))
    }

    /// Finishes queued requests, stops the thread and closes the connection. Idempotent.
    pub fn close(&self) {
        let handle = self.handle.lock().take();
        if let Some(h) = handle {
            let _ = self.tx.send(Msg::Close);
            let _ = h.join();
        }
        // The writer's connection is closed: the checkpoint thread ends and closes its own.
        let checkpointer = self.checkpointer.lock().take();
        if let Some(h) = checkpointer {
            let _ = h.join();
        }
    }

    /// Whether `close` has run.
    pub fn is_closed(&self) -> bool {
        self.handle.lock().is_none()
    }
}

impl Drop for Writer {
    /// Never waits for the thread: the last reference may go away on a thread holding the
    /// GIL (a store collected by Python), while the writer needs the GIL to hand over its
    /// last results. The thread finishes what is queued, then closes the connection itself.
    fn drop(&mut self) {
        if self.handle.lock().take().is_some() {
            let _ = self.tx.send(Msg::Close);
        }
    }
}

/// The bus log's stream known, so logging an event needs no query: keys are the bus's
/// `$bus:<key>` streams. Cleared when it might be wrong (a rolled-back write, a failed commit)
/// or large; a version another process wrote is caught by the unique index and re-read.
/// It also keeps each subscription's finished ranges as they are in the file (merged, so
/// they stay as few as the gaps between them), loaded on first use.
#[derive(Default)]
pub struct Known {
    /// Stream -> its version.
    streams: rustc_hash::FxHashMap<String, i64>,
    /// Subscription -> its finished ranges, first -> last.
    ranges: rustc_hash::FxHashMap<Arc<str>, BTreeMap<i64, i64>>,
    /// (subscription, event type) pairs recorded in `skipped_types`.
    types: rustc_hash::FxHashSet<(Arc<str>, Arc<str>)>,
    /// Pairs skipped since the last transaction, to record with the next.
    pub(crate) new_types: Vec<(Arc<str>, Arc<str>)>,
}

impl Known {
    const MAX: usize = 100_000;

    pub(crate) fn clear(&mut self) {
        self.streams.clear();
        self.ranges.clear();
        self.types.clear();
    }
}

#[cfg(test)]
mod tests;
