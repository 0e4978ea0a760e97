//! The log's tests: versions and optimistic concurrency, snapshots, undelivered events,
//! finished ranges and the progress view, migration of old files, settings.

use super::*;

fn ev(i: usize) -> NewEvent {
    NewEvent {
        event_id: format!("id-{i}"),
        event_type: "T".into(),
        event_version: 1,
        data: format!("{{\"i\":{i}}}"),
        metadata: "{}".into(),
        occurred_at: None,
    }
}

#[test]
fn versions_start_at_one_and_expected_version_guards_appends() {
    let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
    let path = log.path().to_owned();
    let tx = log.begin().unwrap();
    assert_eq!(
        Log::append(&tx, &path, "s", &[ev(1), ev(2)], Some(0))
            .unwrap()
            .0,
        2
    );
    let err = Log::append(&tx, &path, "s", &[ev(3)], Some(1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "concurrency conflict on stream \"s\": expected version 1, but it is at 2"
    );
    assert_eq!(Log::append(&tx, &path, "s", &[ev(3)], None).unwrap().0, 3);
    tx.commit().unwrap();
    let rows = log.read("s", 1).unwrap();
    assert_eq!(rows.iter().map(|r| r.version).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(log.read_all(0, 2).unwrap().len(), 2);
    assert_eq!(log.head().unwrap(), 3);
}

#[test]
fn snapshots_replace_and_load() {
    let log = Log::open(":memory:", Synchronous::Full).unwrap();
    assert!(log.load_snapshot("a").unwrap().is_none());
    log.save_snapshot("a", 3, "{\"x\":1}").unwrap();
    log.save_snapshot("a", 5, "{\"x\":2}").unwrap();
    let s = log.load_snapshot("a").unwrap().unwrap();
    assert_eq!((s.version, s.state.as_str()), (5, "{\"x\":2}"));
}

#[test]
fn undelivered_skips_done_positions_and_starts_where_registered() {
    let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
    let path = log.path().to_owned();
    let tx = log.begin().unwrap();
    Log::append(&tx, &path, "s", &[ev(1), ev(2), ev(3)], None).unwrap();
    Log::mark_range(&tx, "sub", 2, 2, None).unwrap();
    tx.commit().unwrap();
    assert_eq!(log.register_subscription("sub", true).unwrap(), 0);
    assert_eq!(log.register_subscription("late", false).unwrap(), 3);
    let left: Vec<i64> = log
        .undelivered("sub", 0)
        .unwrap()
        .iter()
        .map(|r| r.position)
        .collect();
    assert_eq!(left, [1, 3]);
}

fn positions(log: &Log, sub: &str, after: i64) -> Vec<i64> {
    log.undelivered(sub, after)
        .unwrap()
        .iter()
        .map(|r| r.position)
        .collect()
}

#[test]
fn finished_ranges_leave_gaps_merge_and_split_through_the_progress_view() {
    let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
    let path = log.path().to_owned();
    let events: Vec<NewEvent> = (1..=10).map(ev).collect();
    let tx = log.begin().unwrap();
    Log::append(&tx, &path, "s", &events, None).unwrap();
    let tail = Log::mark_range(&tx, "sub", 1, 3, None).unwrap();
    assert_eq!(
        Log::mark_range(&tx, "sub", 4, 4, Some(tail)).unwrap(),
        (1, 4)
    );
    Log::mark_range(&tx, "sub", 6, 7, None).unwrap();
    Log::mark_range(&tx, "sub", 7, 8, None).unwrap(); // overlapping: merged when read
    Log::mark_range(&tx, "other", 1, 10, None).unwrap();
    tx.commit().unwrap();
    assert_eq!(positions(&log, "sub", 0), [5, 9, 10]);
    assert_eq!(positions(&log, "sub", 6), [9, 10]);
    let n: i64 = log
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM progress_ranges WHERE subscription = 'sub'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 2, "rewritten merged: 1-4 and 6-8");
    let viewed: i64 = log
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM progress WHERE subscription = 'sub'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(viewed, 7);
    // Deleting a finished position through the view splits its range.
    log.conn()
        .execute(
            "DELETE FROM progress WHERE subscription = 'sub' AND position IN (2, 6)",
            [],
        )
        .unwrap();
    assert_eq!(positions(&log, "sub", 0), [2, 5, 6, 9, 10]);
    assert_eq!(positions(&log, "other", 0), Vec::<i64>::new());
}

#[test]
fn a_file_with_the_old_progress_table_is_migrated_to_ranges() {
    let dir = std::env::temp_dir().join(format!("oxbus-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("old.db").to_string_lossy().into_owned();
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE progress (subscription TEXT NOT NULL, position INTEGER NOT NULL,
             PRIMARY KEY (subscription, position)) WITHOUT ROWID;
             INSERT INTO progress VALUES ('sub', 1), ('sub', 2), ('sub', 4);",
        )
        .unwrap();
    }
    let mut log = Log::open(&path, Synchronous::Normal).unwrap();
    let p = log.path().to_owned();
    let tx = log.begin().unwrap();
    Log::append(&tx, &p, "s", &[ev(1), ev(2), ev(3), ev(4)], None).unwrap();
    tx.commit().unwrap();
    assert_eq!(positions(&log, "sub", 0), [3]);
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_synchronous_names_the_value() {
    assert_eq!(
        Synchronous::parse("sometimes").unwrap_err().to_string(),
        "synchronous must be \"normal\" or \"full\", got \"sometimes\""
    );
}
