//! SQLite storage: one row per object, a global monotonic resourceVersion, and an event history
//! that watches resume from. Every write is one transaction that stores the object, appends the
//! event and advances the version, so a restart never loses or reorders anything.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use thiserror::Error;

/// Storage failures (disk, corruption); never user input.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sqlite: {context}")]
    Sqlite {
        context: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("stored object is not valid JSON")]
    Decode(#[source] serde_json::Error),
    #[error("cannot create the data directory")]
    Io(#[source] std::io::Error),
}

impl StoreError {
    /// A fixed word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Sqlite { .. } => "Sqlite",
            StoreError::Decode(_) => "Decode",
            StoreError::Io(_) => "Io",
        }
    }
}

/// Make `dir` (and missing parents) and leave it readable by its owner only.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    narrow(dir, 0o700)
}

/// Create `file` 0600 if missing, else narrow it to 0600.
fn private_file(file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)?;
    narrow(file, 0o600)
}

/// Set `path`'s permission bits to `mode` when it exists.
fn narrow(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

/// Run a statement of the write path, parsed once per connection: parsing it anew took as long
/// as running it.
fn execute(
    conn: &Connection,
    statement: &str,
    params: impl rusqlite::Params,
    context: &'static str,
) -> Result<usize, StoreError> {
    conn.prepare_cached(statement)
        .and_then(|mut s| s.execute(params))
        .map_err(sql(context))
}

/// The kind of change a watch reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    /// The watch event `type` word.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "ADDED" => EventType::Added,
            "DELETED" => EventType::Deleted,
            _ => EventType::Modified,
        }
    }
}

/// One stored change, as replayed to watches.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub rv: u64,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub type_: EventType,
    /// The object after the change (for DELETED: its last state, with the deletion's version).
    pub object: Value,
    /// The object before a MODIFIED change, on live events only (not kept in the history):
    /// lets selector watches see an object enter or leave their selection.
    pub previous: Option<Value>,
}

/// Watching from a version the history no longer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compacted {
    /// The oldest version a watch may start from.
    pub oldest: u64,
}

/// The SQLite-backed object store.
pub struct Store {
    conn: Connection,
    history_limit: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("history_limit", &self.history_limit)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open (or create) `dir/state.db`; the history keeps the last `history_limit` events.
    /// The directory is made 0700 and the database 0600 (it holds the bearer token and the
    /// CA key); an existing, wider store is narrowed.
    pub fn open(dir: &Path, history_limit: u64) -> Result<Self, StoreError> {
        private_dir(dir).map_err(StoreError::Io)?;
        let db = dir.join("state.db");
        private_file(&db).map_err(StoreError::Io)?;
        let conn = Connection::open(&db).map_err(sql("open"))?;
        let store = Self::init(conn, history_limit)?;
        // SQLite gives its WAL and shared-memory files the database's mode; a store written
        // before the database was narrowed may still have wider ones.
        for side in ["state.db-wal", "state.db-shm"] {
            narrow(&dir.join(side), 0o600).map_err(StoreError::Io)?;
        }
        Ok(store)
    }

    /// An in-memory store for unit tests.
    #[cfg(test)]
    pub fn in_memory(history_limit: u64) -> Result<Self, StoreError> {
        Self::init(
            Connection::open_in_memory().map_err(sql("open"))?,
            history_limit,
        )
    }

    fn init(conn: Connection, history_limit: u64) -> Result<Self, StoreError> {
        // WAL + NORMAL: a commit is durable against process crashes without an fsync per write,
        // which is the trade-off a single-machine dev server wants.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS objects (
                resource TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
                uid TEXT NOT NULL, rv INTEGER NOT NULL, body TEXT NOT NULL,
                PRIMARY KEY (resource, namespace, name));
             CREATE TABLE IF NOT EXISTS history (
                rv INTEGER PRIMARY KEY, resource TEXT NOT NULL, namespace TEXT NOT NULL,
                name TEXT NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .map_err(sql("schema"))?;
        Ok(Store {
            conn,
            history_limit: history_limit.max(1),
        })
    }

    /// A value from the key/value table (the token lives there).
    pub fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(sql("meta get"))
    }

    /// Set a value in the key/value table.
    pub fn meta_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(sql("meta set"))
    }

    fn meta_u64(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self
            .meta_get(key)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// The newest resourceVersion handed out.
    pub fn current_rv(&self) -> Result<u64, StoreError> {
        self.meta_u64("rv")
    }

    /// Versions at or below this are gone from the history.
    pub fn compacted_rv(&self) -> Result<u64, StoreError> {
        self.meta_u64("compacted")
    }

    /// One object.
    pub fn get(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, StoreError> {
        let body: Option<String> = self
            .conn
            .prepare_cached(
                "SELECT body FROM objects WHERE resource = ?1 AND namespace = ?2 AND name = ?3",
            )
            .and_then(|mut s| s.query_row(params![resource, namespace, name], |r| r.get(0)))
            .optional()
            .map_err(sql("get"))?;
        body.map(|b| serde_json::from_str(&b).map_err(StoreError::Decode))
            .transpose()
    }

    /// Every object of a resource (in one namespace, or all), ordered by namespace and name,
    /// with the version the list is consistent at.
    pub fn list(
        &self,
        resource: &str,
        namespace: Option<&str>,
    ) -> Result<(Vec<Value>, u64), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT body FROM objects WHERE resource = ?1 AND (?2 IS NULL OR namespace = ?2)
                 ORDER BY namespace, name",
            )
            .map_err(sql("list"))?;
        let rows = stmt
            .query_map(params![resource, namespace], |r| r.get::<_, String>(0))
            .map_err(sql("list"))?;
        let mut out = Vec::new();
        for row in rows {
            let body = row.map_err(sql("list row"))?;
            out.push(serde_json::from_str(&body).map_err(StoreError::Decode)?);
        }
        Ok((out, self.current_rv()?))
    }

    /// Store a change: assigns the next resourceVersion (written into the object), records the
    /// event and returns it. `Deleted` removes the row and records the object's last state.
    pub fn write(
        &mut self,
        resource: &str,
        namespace: &str,
        name: &str,
        type_: EventType,
        mut object: Value,
    ) -> Result<StoredEvent, StoreError> {
        let tx = self.conn.transaction().map_err(sql("begin"))?;
        let current: u64 = tx
            .prepare_cached("SELECT value FROM meta WHERE key = 'rv'")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, String>(0)))
            .optional()
            .map_err(sql("rv"))?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let rv = current + 1;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let body = object.to_string();
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
        match type_ {
            EventType::Deleted => {
                execute(
                    &tx,
                    "DELETE FROM objects WHERE resource = ?1 AND namespace = ?2 AND name = ?3",
                    params![resource, namespace, name],
                    "delete",
                )?;
            }
            EventType::Added | EventType::Modified => {
                execute(
                    &tx,
                    "INSERT INTO objects (resource, namespace, name, uid, rv, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(resource, namespace, name)
                     DO UPDATE SET uid = excluded.uid, rv = excluded.rv, body = excluded.body",
                    params![resource, namespace, name, uid, rv as i64, body],
                    "upsert",
                )?;
            }
        }
        execute(
            &tx,
            "INSERT INTO history (rv, resource, namespace, name, type, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![rv as i64, resource, namespace, name, type_.as_str(), body],
            "history",
        )?;
        execute(
            &tx,
            "INSERT INTO meta (key, value) VALUES ('rv', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [rv.to_string()],
            "rv",
        )?;
        if rv > self.history_limit {
            let oldest_kept = rv - self.history_limit;
            execute(
                &tx,
                "DELETE FROM history WHERE rv <= ?1",
                [oldest_kept as i64],
                "compact",
            )?;
            execute(
                &tx,
                "INSERT INTO meta (key, value) VALUES ('compacted', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [oldest_kept.to_string()],
                "compact",
            )?;
        }
        tx.commit().map_err(sql("commit"))?;
        Ok(StoredEvent {
            rv,
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
            type_,
            object,
            previous: None,
        })
    }

    /// Drop history so that only the newest `keep` events remain (tests and maintenance).
    pub fn compact(&mut self, keep: u64) -> Result<(), StoreError> {
        let current = self.current_rv()?;
        let oldest_kept = current.saturating_sub(keep);
        if oldest_kept > self.compacted_rv()? {
            self.conn
                .execute("DELETE FROM history WHERE rv <= ?1", [oldest_kept as i64])
                .map_err(sql("compact"))?;
            self.meta_set("compacted", &oldest_kept.to_string())?;
        }
        Ok(())
    }

    /// The object as the history had it at version `rv` (None: it did not exist then, or the
    /// history no longer reaches back that far).
    pub fn object_at(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        rv: u64,
    ) -> Result<Option<Value>, StoreError> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT type, body FROM history WHERE resource = ?1 AND namespace = ?2
                 AND name = ?3 AND rv <= ?4 ORDER BY rv DESC LIMIT 1",
                params![resource, namespace, name, rv as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("object at"))?;
        match row {
            Some((type_, body)) if type_ != "DELETED" => Ok(Some(
                serde_json::from_str(&body).map_err(StoreError::Decode)?,
            )),
            _ => Ok(None),
        }
    }

    /// The events of `resource` after version `since`, oldest first; `Compacted` when the
    /// history no longer reaches back that far.
    pub fn history_since(
        &self,
        resource: &str,
        since: u64,
    ) -> Result<Result<Vec<StoredEvent>, Compacted>, StoreError> {
        let compacted = self.compacted_rv()?;
        if since < compacted {
            return Ok(Err(Compacted {
                oldest: compacted + 1,
            }));
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT rv, namespace, name, type, body FROM history
                 WHERE resource = ?1 AND rv > ?2 ORDER BY rv",
            )
            .map_err(sql("history"))?;
        let rows = stmt
            .query_map(params![resource, since as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(sql("history"))?;
        let mut out = Vec::new();
        for row in rows {
            let (rv, namespace, name, type_, body) = row.map_err(sql("history row"))?;
            out.push(StoredEvent {
                rv: rv as u64,
                resource: resource.into(),
                namespace,
                name,
                type_: EventType::parse(&type_),
                object: serde_json::from_str(&body).map_err(StoreError::Decode)?,
                previous: None,
            });
        }
        Ok(Ok(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "uid": "u"}})
    }

    #[test]
    fn versions_are_monotonic_and_written_into_objects() {
        let mut s = Store::in_memory(100).expect("store");
        let a = s
            .write("g/r", "default", "a", EventType::Added, obj("a"))
            .expect("a");
        let b = s
            .write("g/r", "default", "b", EventType::Added, obj("b"))
            .expect("b");
        assert!(b.rv > a.rv);
        let got = s.get("g/r", "default", "a").expect("get").expect("exists");
        assert_eq!(got["metadata"]["resourceVersion"], a.rv.to_string());
        let (items, rv) = s.list("g/r", None).expect("list");
        assert_eq!(items.len(), 2);
        assert_eq!(rv, b.rv);
        s.write("g/r", "default", "a", EventType::Deleted, got)
            .expect("del");
        assert!(s.get("g/r", "default", "a").expect("get").is_none());
    }

    #[test]
    fn history_replays_after_a_version_and_reports_compaction() {
        let mut s = Store::in_memory(3).expect("store");
        for i in 0..5 {
            let name = format!("o{i}");
            s.write("g/r", "ns", &name, EventType::Added, obj(&name))
                .expect("write");
        }
        // Five events, three kept: versions 3..=5 remain, so watching from 2 still works.
        let events = s.history_since("g/r", 2).expect("db").expect("kept");
        assert_eq!(events.iter().map(|e| e.rv).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(
            s.history_since("g/r", 1).expect("db"),
            Err(Compacted { oldest: 3 })
        );
        s.compact(1).expect("compact");
        assert!(s.history_since("g/r", 3).expect("db").is_err());
        assert_eq!(
            s.history_since("g/r", 4).expect("db").expect("kept").len(),
            1
        );
    }

    #[test]
    fn the_store_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("apiserver");
        {
            let s = Store::open(&dir, 10).expect("open");
            s.meta_set("token", "t").expect("meta");
            assert_eq!(mode(&dir), 0o700);
            for f in ["state.db", "state.db-wal", "state.db-shm"] {
                assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
            }
        }
        // A store written by an older version with 0644/0755 is narrowed when opened.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            let p = dir.join(f);
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
                    .expect("chmod");
            }
        }
        let s = Store::open(&dir, 10).expect("reopen");
        assert_eq!(s.meta_get("token").expect("meta").as_deref(), Some("t"));
        assert_eq!(mode(&dir), 0o700);
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let mut s = Store::open(dir.path(), 10).expect("open");
            s.write("g/r", "ns", "a", EventType::Added, obj("a"))
                .expect("write");
            s.meta_set("token", "t").expect("meta");
        }
        let s = Store::open(dir.path(), 10).expect("reopen");
        assert_eq!(s.current_rv().expect("rv"), 1);
        assert_eq!(s.meta_get("token").expect("meta").as_deref(), Some("t"));
        assert!(s.get("g/r", "ns", "a").expect("get").is_some());
    }
}
