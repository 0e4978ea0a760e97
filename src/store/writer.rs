//! The writer thread: owns the connection, applies requests in batches.
//!
//! Requests queue on a channel. The thread takes everything queued (up to `MAX_BATCH`), runs
//! all writes of the batch in one transaction — each append in a savepoint of its own, so one
//! conflict fails one request, not the batch — commits once (group commit: many publishers
//! share one fsync), then runs the reads and hands every result to the `Sink` in one call. The
//! Python glue turns that call into one wake-up of the asyncio loop per batch.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};
use parking_lot::Mutex;

use rusqlite::types::Value;

use crate::store::log::{DeadRow, Log, NewEvent, Snapshot, StoredRow, Synchronous};
use crate::store::saga::{self, SagaWrite};
use crate::store::{Result, StoreError};

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
/// transaction. Workers and the bus push here without a request, a future or the GIL; the
/// first push after the writer emptied the buffer wakes the writer once.
#[derive(Default)]
pub(crate) struct Marks(Mutex<Waiting>);

/// Finished deliveries and skipped events.
type Waiting = (Vec<(Arc<str>, i64)>, Vec<Skip>);

impl Marks {
    /// Everything waiting, skips turned into marks; the (subscription, type) pairs skipped go
    /// to `types`.
    pub(crate) fn take(&self, types: &mut Vec<(Arc<str>, Arc<str>)>) -> Vec<(Arc<str>, i64)> {
        let (mut marks, skips) = std::mem::take(&mut *self.0.lock());
        for (position, event_type, subs) in skips {
            for sub in subs.iter() {
                marks.push((Arc::clone(sub), position));
                types.push((Arc::clone(sub), Arc::clone(&event_type)));
            }
        }
        marks
    }

    /// Adds with `f`; true when the buffer was empty (the writer must be woken).
    fn push(&self, f: impl FnOnce(&mut Waiting)) -> bool {
        let mut m = self.0.lock();
        let was_empty = m.0.is_empty() && m.1.is_empty();
        f(&mut m);
        was_empty
    }

    /// Puts back marks taken for a transaction that did not commit: the writer commits them
    /// with its next one.
    pub(crate) fn restore(&self, marks: Vec<(Arc<str>, i64)>) {
        self.0.lock().0.extend(marks);
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
/// WAL pages after which the writer checkpoints itself, blocking its commits until the WAL can
/// start over (the other thread fell behind: a loaded machine starved it). 8,000 pages of
/// 4 KiB: the WAL stays under ~32 MB whatever the load.
const CHECKPOINT_INLINE: i32 = 8_000;

use crate::store::log::in_memory;

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
            let (wake, wakes) = crossbeam_channel::bounded::<()>(1);
            let ckpt = Log::open(path, sync)?;
            let handle = std::thread::Builder::new()
                .name("oxbus-checkpoint".into())
                .spawn(move || {
                    // Ends when the writer's connection (and with it `wake`) is gone.
                    while wakes.recv().is_ok() {
                        // The long copy without blocking the writer, then a short blocking
                        // pass over what it committed meanwhile, so the WAL can start over.
                        for mode in ["PASSIVE", "RESTART"] {
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
            log.delegate_checkpoints(CHECKPOINT_INLINE, move |pages| {
                if pages >= CHECKPOINT_AT {
                    let _ = wake.try_send(());
                }
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
        if self.marks.push(|m| m.0.push((subscription, position))) {
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
        if self.marks.push(|m| m.1.push((position, event_type, subs))) {
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

/// Watches that the WAL the writer commits into is still the file at `<path>-wal`.
///
/// Another copy of SQLite in the same process (Python's `sqlite3` module is one) keeps its own
/// POSIX lock bookkeeping: when it closes the file, the process's locks on it are gone, so it
/// (or the next process to open the file) takes itself for the last user and deletes the WAL
/// while this writer still appends to it, and whatever is committed there afterwards vanishes
/// with the process. After every commit the writer compares the WAL's inode with the one it
/// opened; when it changed or the file is gone, it checkpoints what its own WAL holds into the
/// database file (so what it acknowledges is on disk) and refuses every later write.
pub(crate) struct WalGuard {
    wal: Option<std::path::PathBuf>,
    id: Option<(u64, u64)>,
    pub(crate) detached: bool,
}

impl WalGuard {
    fn new(log: &Log, watch: bool) -> Self {
        let wal = (watch && !crate::store::log::in_memory(log.path()))
            .then(|| std::path::PathBuf::from(format!("{}-wal", log.path())));
        let id = wal.as_deref().and_then(Self::file_id);
        Self {
            wal,
            id,
            detached: false,
        }
    }

    #[cfg(unix)]
    fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    #[cfg(not(unix))]
    fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
        std::fs::metadata(path).ok().map(|_| (0, 0))
    }

    /// Whether the WAL is still the one the writer opened (or there is none to watch), and
    /// no replacement was seen before: what a commit on another thread checks before and
    /// after it commits.
    pub(crate) fn still_ours(&self) -> bool {
        if self.detached {
            return false;
        }
        match (&self.wal, self.id) {
            (None, _) => true,
            (Some(wal), Some(id)) => Self::file_id(wal) == Some(id),
            (Some(_), None) => false, // not seen yet: the writer records it first
        }
    }

    fn error(log: &Log) -> StoreError {
        StoreError::Detached(log.path().to_owned())
    }

    /// Checks the WAL after commits and passes `results` on: unchanged while the WAL is ours
    /// (or when what it held was saved into the database file), else failed.
    fn vet(&mut self, log: &Log, results: Vec<(u64, Result<Reply>)>) -> Vec<(u64, Result<Reply>)> {
        let Some(wal) = &self.wal else {
            return results;
        };
        if self.detached || self.id.is_none() || Self::file_id(wal) == self.id {
            if self.id.is_none() {
                self.id = Self::file_id(wal);
            }
            return results;
        }
        self.detached = true;
        // Our WAL is unlinked but still open: copy every frame it holds into the database.
        let mut saved = false;
        for _ in 0..500 {
            match log
                .conn()
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                }) {
                Ok(0) => {
                    saved = true;
                    break;
                }
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        if saved {
            results
        } else {
            results
                .into_iter()
                .map(|(t, _)| (t, Err(Self::error(log))))
                .collect()
        }
    }
}

#[allow(clippy::too_many_lines)] // one loop: take a batch, apply it, answer it
fn run(core: &Mutex<Option<Core>>, rx: &Receiver<Msg>, sink: &dyn Sink, marks: &Marks) {
    let path = core
        .lock()
        .as_ref()
        .map(|c| c.log.path().to_owned())
        .unwrap_or_default();
    let mut closing = false;
    // Messages that arrived while a large log group held the transaction.
    let mut deferred: VecDeque<Msg> = VecDeque::new();
    while !closing {
        let first = match deferred.pop_front() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            },
        };
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
            Msg::Wake => {
                // Only marks: let more gather (or a request come) for a moment, so a busy
                // bus commits its progress a few hundred times a second, not per event.
                let until = std::time::Instant::now() + MARKS_LINGER;
                while deferred.is_empty() && std::time::Instant::now() < until {
                    if let Ok(m) = rx.recv_deadline(until) {
                        deferred.push_back(m);
                    }
                }
            }
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
        let mut marked = marks.take(&mut known.new_types);
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
fn write_ranges(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    type Batch = Vec<(u64, Result<Reply>)>;
    struct Collect(Mutex<mpsc::Sender<Batch>>);
    impl Sink for Collect {
        fn deliver(&self, results: Batch) {
            let _ = self.0.lock().send(results);
        }
    }

    fn ev(id: &str) -> NewEvent {
        NewEvent {
            event_id: id.into(),
            event_type: "T".into(),
            event_version: 1,
            data: "{}".into(),
            metadata: "{}".into(),
            occurred_at: None,
        }
    }

    fn in_memory_writer() -> (Writer, mpsc::Receiver<Batch>) {
        let (tx, rx) = mpsc::channel();
        let w = Writer::open(
            ":memory:",
            Synchronous::Normal,
            Arc::new(Collect(Mutex::new(tx))),
        )
        .unwrap();
        (w, rx)
    }

    /// A fresh directory, a writer on a file in it, and the receiver of its results.
    fn on_file(tag: &str) -> (std::path::PathBuf, String, Writer, mpsc::Receiver<Batch>) {
        let dir = std::env::temp_dir().join(format!("oxbus-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db").to_string_lossy().into_owned();
        let (tx, rx) = mpsc::channel();
        let w = Writer::open(
            &path,
            Synchronous::Normal,
            Arc::new(Collect(Mutex::new(tx))),
        )
        .unwrap();
        (dir, path, w, rx)
    }

    /// A bus-log request for event `i` with `pad` as its data.
    fn padded(i: u64, pad: &str) -> Op {
        let mut e = ev(&format!("e{i}"));
        e.data = format!("{{\"pad\":\"{pad}\"}}");
        Op::Log {
            items: vec![(format!("$bus:k{}", i % 7), e)],
        }
    }

    #[test]
    fn one_conflict_fails_one_request_not_the_batch() {
        let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
        let batch = vec![
            (
                1,
                Op::Append {
                    stream: "s".into(),
                    events: vec![ev("a")],
                    expected: Some(0),
                },
            ),
            (
                2,
                Op::Append {
                    stream: "s".into(),
                    events: vec![ev("b")],
                    expected: Some(0),
                },
            ),
            (
                3,
                Op::Append {
                    stream: "t".into(),
                    events: vec![ev("c"), ev("d")],
                    expected: None,
                },
            ),
            (
                4,
                Op::ReadAll {
                    after_position: 0,
                    limit: 10,
                },
            ),
        ];
        let out = apply(&mut log, batch, &[("x".into(), 1)], &mut Known::default());
        assert_eq!(out.len(), 4);
        assert_eq!(
            out[0].1.as_ref().unwrap(),
            &Reply::Appended {
                version: 1,
                first_position: 1
            }
        );
        assert!(matches!(
            out[1].1,
            Err(StoreError::Concurrency {
                expected: 0,
                actual: 1,
                ..
            })
        ));
        assert_eq!(
            out[2].1.as_ref().unwrap(),
            &Reply::Appended {
                version: 2,
                first_position: 2
            }
        );
        let Ok(Reply::Rows(rows)) = &out[3].1 else {
            panic!("{:?}", out[3])
        };
        assert_eq!(
            rows.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>(),
            ["a", "c", "d"]
        );
    }

    #[test]
    fn the_thread_answers_in_batches_and_refuses_after_close() {
        let (w, rx) = in_memory_writer();
        for i in 1..=100u64 {
            w.submit(
                i,
                Op::Append {
                    stream: format!("s{i}"),
                    events: vec![ev(&format!("e{i}"))],
                    expected: Some(0),
                },
            )
            .unwrap();
        }
        let mut seen = 0;
        while seen < 100 {
            let batch = rx.recv().unwrap();
            assert!(batch.iter().all(|(_, r)| r.is_ok()));
            seen += batch.len();
        }
        w.close();
        assert!(w.is_closed());
        assert!(matches!(
            w.submit(7, Op::DeadLetters),
            Err(StoreError::Closed(_))
        ));
    }

    #[test]
    fn marks_are_committed_by_close_without_any_request() {
        let dir = std::env::temp_dir().join(format!("oxbus-marks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.db").to_string_lossy().into_owned();
        let w = Writer::open(
            &path,
            Synchronous::Normal,
            Arc::new(Collect(Mutex::new(mpsc::channel().0))),
        )
        .unwrap();
        for p in 1..=3 {
            w.mark_done("sub".into(), p).unwrap();
        }
        w.close();
        assert!(w.mark_done("sub".into(), 4).is_err(), "refused after close");
        let log = Log::open(&path, Synchronous::Normal).unwrap();
        let ranges = log_count(
            &log,
            "SELECT COUNT(*) FROM progress_ranges WHERE subscription = 'sub'",
        );
        let covered = log_count(&log, "SELECT SUM(last - first + 1) FROM progress_ranges");
        assert_eq!((ranges, covered), (1, 3), "three positions in one range");
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_commit_on_the_calling_thread_carries_the_marks_waiting_before_it() {
        let dir = std::env::temp_dir().join(format!("oxbus-now-marks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n.db").to_string_lossy().into_owned();
        let w = Writer::open(
            &path,
            Synchronous::Normal,
            Arc::new(Collect(Mutex::new(mpsc::channel().0))),
        )
        .unwrap();
        let reader = Log::open(&path, Synchronous::Normal).unwrap();
        for round in 1..=20_i64 {
            w.mark_done("sub".into(), round).unwrap();
            // The writer thread may hold the connection for a moment: then nothing is written
            // here and the caller would queue the request for it instead.
            let logged = loop {
                if let Some(r) = w.log_now(&[("s".into(), ev(&format!("e{round}")))]) {
                    break r.unwrap();
                }
                std::thread::yield_now();
            };
            assert!(matches!(logged, crate::store::now::Logged::Positions(_)));
            // Every mark pushed before the commit is committed by now: taken by this commit,
            // or by the writer thread's before it (which holds the connection meanwhile).
            let covered = log_count(
                &reader,
                "SELECT COALESCE(SUM(last - first + 1), 0) FROM progress_ranges",
            );
            assert_eq!(covered, round, "round {round}");
        }
        w.close();
        drop(reader);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn log_count(log: &Log, sql: &str) -> i64 {
        log.conn().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn logged_versions_follow_appends_made_by_another_connection() {
        let dir = std::env::temp_dir().join(format!("oxbus-versions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.db").to_string_lossy().into_owned();
        let mut mine = Log::open(&path, Synchronous::Normal).unwrap();
        let mut other = Log::open(&path, Synchronous::Normal).unwrap();
        let mut known = Known::default();
        let log = |log: &mut Log, known: &mut Known, id: &str| {
            let out = apply(
                log,
                vec![(
                    1,
                    Op::Log {
                        items: vec![("$bus:k".into(), ev(id))],
                    },
                )],
                &[],
                known,
            );
            out.into_iter().next().unwrap().1.unwrap()
        };
        assert_eq!(log(&mut mine, &mut known, "a"), Reply::Positions(vec![1]));
        // Another writer appends version 2 behind our cache's back.
        let _ = log(&mut other, &mut Known::default(), "b");
        assert_eq!(log(&mut mine, &mut known, "c"), Reply::Positions(vec![3]));
        let rows = mine.read("$bus:k", 0).unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.version, r.event_id.as_str()))
                .collect::<Vec<_>>(),
            [(1, "a"), (2, "b"), (3, "c")]
        );
        drop((mine, other));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_group_sent_in_parts_commits_once_and_an_abandoned_one_writes_nothing() {
        let (w, rx) = in_memory_writer();
        let item = |i: usize| (format!("$bus:k{}", i % 3), ev(&format!("g{i}")));
        {
            let mut abandoned = w.log_group();
            abandoned.part((0..5).map(item).collect()).unwrap();
        } // dropped unfinished: LogAbort
        let mut g = w.log_group();
        g.part((10..15).map(item).collect()).unwrap();
        // A request arriving while the group is open waits for it.
        w.submit(
            1,
            Op::ReadAll {
                after_position: 0,
                limit: 100,
            },
        )
        .unwrap();
        g.part((15..20).map(item).collect()).unwrap();
        g.end(2, (20..22).map(item).collect()).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(rx.recv().unwrap());
        }
        got.sort_by_key(|(t, _)| *t);
        let Ok(Reply::Positions(ps)) = &got[1].1 else {
            panic!("{:?}", got[1])
        };
        assert_eq!(
            ps,
            &(1..=12).collect::<Vec<i64>>(),
            "nothing of the abandoned group"
        );
        let Ok(Reply::Rows(rows)) = &got[0].1 else {
            panic!("{:?}", got[0])
        };
        assert_eq!(rows.len(), 12, "the read ran after the group committed");
        assert_eq!(rows[0].event_id, "g10");
        w.close();
    }

    #[test]
    fn checkpoints_run_off_the_writer_and_close_leaves_no_wal_behind() {
        let (dir, path, w, rx) = on_file("ckpt");
        let big = "x".repeat(2000);
        for i in 0..3000u64 {
            w.submit(i + 1, padded(i, &big)).unwrap();
        }
        let mut seen = 0;
        while seen < 3000 {
            let batch = rx.recv().unwrap();
            assert!(batch.iter().all(|(_, r)| r.is_ok()), "{batch:?}");
            seen += batch.len();
        }
        w.close();
        assert!(
            !std::path::Path::new(&format!("{path}-wal")).exists(),
            "the last connection checkpoints and removes the WAL"
        );
        let log = Log::open(&path, Synchronous::Normal).unwrap();
        assert_eq!(log.head().unwrap(), 3000);
        drop(log);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn many_small_commits_never_fail_and_keep_the_wal_bounded() {
        let (dir, path, w, rx) = on_file("smallc");
        let pad = "y".repeat(1500);
        let mut biggest_wal = 0;
        for i in 0..12_000u64 {
            w.submit(i + 1, padded(i, &pad)).unwrap();
            w.mark_done("sub".into(), i64::try_from(i).unwrap() + 1)
                .unwrap();
            let batch = rx.recv().unwrap(); // one commit per event, as one awaiting publisher
            assert!(
                batch.iter().all(|(_, r)| r.is_ok()),
                "commit {i}: {batch:?}"
            );
            if i % 500 == 0 {
                let len = std::fs::metadata(format!("{path}-wal")).map_or(0, |m| m.len());
                biggest_wal = biggest_wal.max(len);
            }
        }
        w.close();
        assert!(
            biggest_wal < 40 << 20,
            "the WAL reached {biggest_wal} bytes (16,000 pages are 64 MB)"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn skipped_and_finished_positions_merge_into_one_range_in_any_order() {
        let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
        let mut known = Known::default();
        let sub: Arc<str> = "a".into();
        let items = (0..10)
            .map(|i| ("$bus".to_owned(), ev(&format!("e{i}"))))
            .collect();
        let _ = apply(&mut log, vec![(1, Op::Log { items })], &[], &mut known);
        // Odd positions are the subscription's, finished late and out of order; even ones it
        // was never routed.
        let mark = |log: &mut Log, known: &mut Known, ps: &[i64]| {
            let marks: Vec<(Arc<str>, i64)> = ps.iter().map(|p| (Arc::clone(&sub), *p)).collect();
            let _ = apply(log, Vec::new(), &marks, known);
        };
        mark(&mut log, &mut known, &[2, 4, 6, 8, 10]);
        mark(&mut log, &mut known, &[9, 3]);
        mark(&mut log, &mut known, &[1, 7]);
        assert_eq!(
            log_count(&log, "SELECT COUNT(*) FROM progress_ranges"),
            2,
            "1-4 and 6-10: one gap, one range each side"
        );
        // Another connection re-queues position 8 (as `oxbus dlq retry` does): noticed.
        log.conn()
            .execute(
                "DELETE FROM progress WHERE subscription = 'a' AND position = 8",
                [],
            )
            .unwrap();
        mark(&mut log, &mut known, &[5]);
        let ranges: Vec<(i64, i64)> = log
            .conn()
            .prepare("SELECT first, last FROM progress_ranges ORDER BY first")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(ranges, [(1, 7), (9, 10)]);
    }

    #[test]
    fn a_saga_change_commits_with_its_events_and_progress_or_not_at_all() {
        use crate::store::saga::{DeadlineRow, SagaRow};
        let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
        let mut known = Known::default();
        let _ = apply(
            &mut log,
            vec![(
                1,
                Op::Log {
                    items: vec![("$bus:o-1".into(), ev("placed"))],
                },
            )],
            &[],
            &mut known,
        );
        let change = |applied: &str, command: &str| SagaWrite {
            saga: "Order".into(),
            key: "o-1".into(),
            instance: Some(SagaRow {
                status: "running".into(),
                step: Some("placed".into()),
                state: "{}".into(),
                compensations: "[]".into(),
                error: None,
                correlation_id: None,
                steps: 1,
                compensated: false,
            }),
            applied: Some(applied.into()),
            deadlines: Some(vec![DeadlineRow {
                name: "timeout".into(),
                due: 60.0,
                event: "{}".into(),
            }]),
            events: vec![("$bus:o-1".into(), ev(command))],
            done: Some(("Order.placed".into(), 1)),
        };
        let out = apply(
            &mut log,
            vec![
                (2, Op::Saga(Box::new(change("@1", "reserve")))),
                (3, Op::Saga(Box::new(change("@1", "reserve-again")))),
            ],
            &[],
            &mut known,
        );
        assert_eq!(out[0].1.as_ref().unwrap(), &Reply::Saga(Some(vec![2])));
        assert_eq!(
            out[1].1.as_ref().unwrap(),
            &Reply::Saga(None),
            "applied already"
        );
        assert_eq!(
            log.read("$bus:o-1", 0)
                .unwrap()
                .iter()
                .map(|r| r.event_id.as_str())
                .collect::<Vec<_>>(),
            ["placed", "reserve"],
            "the second change logged nothing"
        );
        assert_eq!(
            log_count(
                &log,
                "SELECT COUNT(*) FROM progress WHERE subscription = 'Order.placed' AND position = 1"
            ),
            1
        );
        // A change that fails (a bad status) writes none of its parts.
        let mut bad = change("@5", "never");
        bad.instance.as_mut().unwrap().status = "paused".into();
        bad.done = Some(("Order.placed".into(), 2));
        let out = apply(
            &mut log,
            vec![(4, Op::Saga(Box::new(bad)))],
            &[],
            &mut known,
        );
        assert!(out[0].1.is_err());
        assert_eq!(log.head().unwrap(), 2);
        assert_eq!(
            log_count(&log, "SELECT COUNT(*) FROM saga_applied WHERE event = '@5'"),
            0
        );
        assert_eq!(
            log_count(
                &log,
                "SELECT COUNT(*) FROM progress WHERE subscription = 'Order.placed'"
            ),
            1
        );
    }

    #[test]
    fn opening_a_directory_fails_with_the_path() {
        let err = Writer::open(
            "/",
            Synchronous::Normal,
            Arc::new(Collect(Mutex::new(mpsc::channel().0))),
        )
        .unwrap_err();
        assert!(err.to_string().contains("SQLite error on /"), "{err}");
    }
}
