//! The writer's tests: batches and conflicts, marks, log groups, commits on the calling
//! thread, checkpoints and the WAL, progress ranges, saga changes.

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
fn a_commit_on_the_calling_thread_carries_the_marks_that_waited_half_the_linger() {
    let (dir, path, w, _rx) = on_file("now-marks");
    let reader = Log::open(&path, Synchronous::Normal).unwrap();
    for round in 1..=20_i64 {
        w.mark_done("sub".into(), round).unwrap();
        // Younger marks wait for company (the writer's linger, or a later commit): age this
        // one past half the linger, the time the policy itself reads (sleep-ok).
        std::thread::sleep(super::MARKS_LINGER / 2 + std::time::Duration::from_millis(1));
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
        assert_eq!(covered_positions(&reader), round, "round {round}");
    }
    w.close();
    drop(reader);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn marks_alone_are_committed_by_the_writer_each_time_one_comes() {
    // One wake at a time is sent for marks (pushes while one is on its way send none): after
    // the writer took them, the next mark must wake it again, with or without commits from
    // the calling thread between them.
    let (dir, path, w, _rx) = on_file("marks-alone");
    let reader = Log::open(&path, Synchronous::Normal).unwrap();
    let covered = || covered_positions(&reader);
    for round in 1..=5_i64 {
        w.mark_done("sub".into(), 2 * round - 1).unwrap();
        if round % 2 == 0 {
            // A young mark is left for the writer by a commit on this thread.
            while w
                .log_now(&[("s".into(), ev(&format!("e{round}")))])
                .is_none()
            {
                std::thread::yield_now();
            }
        }
        w.mark_done("sub".into(), 2 * round).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while covered() < 2 * round && std::time::Instant::now() < deadline {
            // sleep-ok: polls the file for the writer's own commit
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(covered(), 2 * round, "round {round}");
    }
    w.close();
    drop(reader);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_writers_requests_leave_young_marks_to_be_committed_alone_after_the_linger() {
    // A mark committed with every request would add a page to each commit (at FULL, to each
    // sync); the writer takes marks with a request only once they waited half the linger.
    let (dir, path, w, rx) = on_file("young-marks");
    let reader = Log::open(&path, Synchronous::Normal).unwrap();
    let mut checked = 0;
    for round in 1..=10_u64 {
        let pushed = std::time::Instant::now();
        w.mark_done("sub".into(), i64::try_from(round).unwrap())
            .unwrap();
        w.submit(round, padded(round, "x")).unwrap();
        assert!(rx.recv().unwrap().iter().all(|(_, r)| r.is_ok()));
        if pushed.elapsed() < super::MARKS_LINGER / 2 {
            checked += 1;
            assert_eq!(
                covered_positions(&reader),
                i64::try_from(round).unwrap() - 1,
                "round {round}"
            );
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while covered_positions(&reader) < i64::try_from(round).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the mark was never committed"
            );
            // sleep-ok: polls the file for the writer's own commit
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    assert!(
        checked > 0,
        "no request was answered within half the linger"
    );
    w.close();
    drop(reader);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_wal_guard_sees_its_wal_deleted() {
    let dir = std::env::temp_dir().join(format!("oxbus-wal-guard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("g.db").to_string_lossy().into_owned();
    let wal = format!("{path}-wal");
    let log = Log::open(&path, Synchronous::Normal).unwrap();
    log.conn()
        .execute_batch("CREATE TABLE IF NOT EXISTS t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    assert!(std::path::Path::new(&wal).exists());
    let guard = super::WalGuard::new(&log, true);
    assert!(guard.still_ours());
    std::fs::remove_file(&wal).unwrap(); // what another SQLite copy in the process does
    assert!(!guard.still_ours());
    std::fs::write(&wal, b"").unwrap(); // and a new file at the path is not ours either
    assert!(!guard.still_ours());
    assert!(super::WalGuard::new(&log, false).still_ours()); // nothing watched
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Positions the progress ranges cover, all subscriptions together.
fn covered_positions(log: &Log) -> i64 {
    log_count(
        log,
        "SELECT COALESCE(SUM(last - first + 1), 0) FROM progress_ranges",
    )
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

#[test]
fn the_checkpoint_thread_is_woken_once_per_thousand_pages_not_per_commit() {
    let mut next = CHECKPOINT_AT;
    let mut wakes = Vec::new();
    // A WAL growing by 5 pages a commit that never starts over (the passes never catch up).
    for pages in (5..=3_000).step_by(5) {
        next = next_wake(next, pages, || {
            wakes.push(pages);
            true
        });
    }
    assert_eq!(wakes, vec![1_000, 2_000, 3_000]);
    // A wake-up the thread did not take (it was busy) is tried again with the next commit.
    let busy = next_wake(CHECKPOINT_AT, 1_000, || false);
    assert_eq!(busy, CHECKPOINT_AT);
    // The WAL started over: the next wake-up is at `CHECKPOINT_AT` pages again.
    let after_restart = next_wake(4_000, 7, || unreachable!("7 pages wake nothing"));
    assert_eq!(after_restart, CHECKPOINT_AT);
}
