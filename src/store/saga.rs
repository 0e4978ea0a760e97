//! Saga instances in the log's file: their state, the events applied to them and their
//! deadlines.
//!
//! A change of an instance is one `SagaWrite`, applied by the writer inside the batch's
//! transaction (in a savepoint of its own) together with the events the change publishes and
//! the progress mark of the event that caused it: after a crash either all of it is in the
//! file or none of it is. `saga_applied` holds every event applied to an instance (its
//! reference: a log position or an event id); a write whose reference is there already
//! changes nothing, which is what makes a redelivered event harmless.

use rusqlite::{params, Connection, OptionalExtension};

use crate::store::record::{now_iso, NewEvent};
use crate::store::{Result, StoreError};

/// The saga tables, created with the log's schema.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS saga_instances (
    saga           TEXT    NOT NULL,
    key            TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    step           TEXT,
    state          TEXT    NOT NULL,
    compensations  TEXT    NOT NULL,
    error          TEXT,
    correlation_id TEXT,
    steps          INTEGER NOT NULL,
    compensated    INTEGER NOT NULL,
    started_at     TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL,
    PRIMARY KEY (saga, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS saga_instances_by_status ON saga_instances (saga, status);
CREATE TABLE IF NOT EXISTS saga_applied (
    saga  TEXT NOT NULL,
    key   TEXT NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (saga, key, event)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS saga_deadlines (
    saga  TEXT NOT NULL,
    key   TEXT NOT NULL,
    name  TEXT NOT NULL,
    due   REAL NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (saga, key, name)
) WITHOUT ROWID;
";

/// The states an instance can be in.
pub const STATES: [&str; 4] = ["running", "completed", "compensated", "failed"];

/// An instance as it is after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaRow {
    /// One of `STATES`.
    pub status: String,
    /// The last step applied.
    pub step: Option<String>,
    /// The state, as JSON.
    pub state: String,
    /// The compensations registered, as a JSON list.
    pub compensations: String,
    /// Why it failed.
    pub error: Option<String>,
    /// The correlation id of the event that started it.
    pub correlation_id: Option<String>,
    /// How many events were applied.
    pub steps: i64,
    /// Whether its compensations were published.
    pub compensated: bool,
}

/// A deadline of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadlineRow {
    /// Its name (unique per instance).
    pub name: String,
    /// When it fires, in seconds on the bus's clock.
    pub due: f64,
    /// The event it publishes, as JSON.
    pub event: String,
}

/// One change of one instance, written atomically with what it publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaWrite {
    /// The saga's name.
    pub saga: String,
    /// The instance's key.
    pub key: String,
    /// The instance after the change (None: only its deadlines change).
    pub instance: Option<SagaRow>,
    /// The event applied, by reference (None: a deadline fired).
    pub applied: Option<String>,
    /// The instance's deadlines after the change, all of them (None: unchanged).
    pub deadlines: Option<Vec<DeadlineRow>>,
    /// Events to append to the bus's log: (stream, event).
    pub events: Vec<(String, NewEvent)>,
    /// The progress of the event that caused the change: (subscription, position).
    pub done: Option<(String, i64)>,
}

impl SagaWrite {
    /// Refuses what the file must never hold: an unknown status, an empty name or key, a
    /// deadline that is not a finite time.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(StoreError::Invalid(why));
        if self.saga.is_empty() || self.key.is_empty() {
            return bad(format!(
                "a saga write needs a saga name and a key, got {:?} and {:?}",
                self.saga, self.key
            ));
        }
        if let Some(row) = &self.instance {
            if !STATES.contains(&row.status.as_str()) {
                return bad(format!(
                    "saga {} {}: status must be one of {}, got {:?}",
                    self.saga,
                    self.key,
                    STATES.join(", "),
                    row.status
                ));
            }
        }
        for d in self.deadlines.iter().flatten() {
            if !d.due.is_finite() || d.name.is_empty() {
                return bad(format!(
                    "saga {} {}: a deadline needs a name and a finite due time, got {:?} at {}",
                    self.saga, self.key, d.name, d.due
                ));
            }
        }
        Ok(())
    }
}

/// Writes the instance's part of `w` inside `tx` (the caller logs `w.events` and records
/// `w.done`). Returns false, having written nothing, when `w.applied` was applied already.
pub fn write(tx: &Connection, w: &SagaWrite) -> rusqlite::Result<bool> {
    if let Some(event) = &w.applied {
        let added = tx
            .prepare_cached(
                "INSERT INTO saga_applied (saga, key, event) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
            )?
            .execute(params![w.saga, w.key, event])?;
        if added == 0 {
            return Ok(false);
        }
    }
    if let Some(r) = &w.instance {
        let now = now_iso();
        tx.prepare_cached(
            "INSERT INTO saga_instances (saga, key, status, step, state, compensations, error,
                 correlation_id, steps, compensated, started_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)
             ON CONFLICT (saga, key) DO UPDATE SET status = excluded.status,
                 step = excluded.step, state = excluded.state,
                 compensations = excluded.compensations, error = excluded.error,
                 steps = excluded.steps, compensated = excluded.compensated,
                 updated_at = excluded.updated_at",
        )?
        .execute(params![
            w.saga,
            w.key,
            r.status,
            r.step,
            r.state,
            r.compensations,
            r.error,
            r.correlation_id,
            r.steps,
            r.compensated,
            now
        ])?;
    }
    if let Some(deadlines) = &w.deadlines {
        tx.prepare_cached("DELETE FROM saga_deadlines WHERE saga = ?1 AND key = ?2")?
            .execute(params![w.saga, w.key])?;
        let mut ins = tx.prepare_cached(
            "INSERT INTO saga_deadlines (saga, key, name, due, event) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for d in deadlines {
            ins.execute(params![w.saga, w.key, d.name, d.due, d.event])?;
        }
    }
    Ok(true)
}

/// The status of an instance, if it exists (for tests and tools).
pub fn status(conn: &Connection, saga: &str, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT status FROM saga_instances WHERE saga = ?1 AND key = ?2",
        params![saga, key],
        |r| r.get(0),
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::log::{Log, Synchronous};

    fn row(status: &str, steps: i64) -> SagaRow {
        SagaRow {
            status: status.into(),
            step: Some("placed".into()),
            state: "{\"n\":1}".into(),
            compensations: "[]".into(),
            error: None,
            correlation_id: Some("c-1".into()),
            steps,
            compensated: false,
        }
    }

    fn change(applied: &str, status: &str, steps: i64) -> SagaWrite {
        SagaWrite {
            saga: "Order".into(),
            key: "o-1".into(),
            instance: Some(row(status, steps)),
            applied: Some(applied.into()),
            deadlines: Some(vec![DeadlineRow {
                name: "timeout".into(),
                due: 1800.0,
                event: "{}".into(),
            }]),
            events: Vec::new(),
            done: None,
        }
    }

    fn count(log: &Log, sql: &str) -> i64 {
        log.conn().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn an_event_applied_already_changes_nothing() {
        let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
        let tx = log.begin().unwrap();
        assert!(write(&tx, &change("@1", "running", 1)).unwrap());
        assert!(
            !write(&tx, &change("@1", "completed", 2)).unwrap(),
            "redelivered"
        );
        assert!(write(&tx, &change("@2", "completed", 2)).unwrap());
        tx.commit().unwrap();
        assert_eq!(
            status(log.conn(), "Order", "o-1").unwrap().as_deref(),
            Some("completed")
        );
        assert_eq!(count(&log, "SELECT steps FROM saga_instances"), 2);
        assert_eq!(count(&log, "SELECT COUNT(*) FROM saga_applied"), 2);
    }

    #[test]
    fn deadlines_are_replaced_as_a_whole_and_kept_when_not_given() {
        let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
        let tx = log.begin().unwrap();
        write(&tx, &change("@1", "running", 1)).unwrap();
        let mut keep = change("@2", "running", 2);
        keep.deadlines = None;
        write(&tx, &keep).unwrap();
        let kept: i64 = tx
            .query_row("SELECT COUNT(*) FROM saga_deadlines", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 1);
        let mut clear = change("@3", "completed", 3);
        clear.deadlines = Some(Vec::new());
        write(&tx, &clear).unwrap();
        tx.commit().unwrap();
        assert_eq!(count(&log, "SELECT COUNT(*) FROM saga_deadlines"), 0);
        assert_eq!(
            count(&log, "SELECT started_at <= updated_at FROM saga_instances"),
            1
        );
    }

    #[test]
    fn bad_writes_name_the_value() {
        let mut w = change("@1", "paused", 1);
        assert_eq!(
            w.check().unwrap_err().to_string(),
            "saga Order o-1: status must be one of running, completed, compensated, failed, got \"paused\""
        );
        w.instance = None;
        w.deadlines = Some(vec![DeadlineRow {
            name: "t".into(),
            due: f64::NAN,
            event: "{}".into(),
        }]);
        assert!(w
            .check()
            .unwrap_err()
            .to_string()
            .contains("finite due time"));
    }
}
