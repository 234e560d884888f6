//! The SQLite spool: where events wait, in order, while Kafka is away.
//!
//! One table, `spool(seq INTEGER PRIMARY KEY, source, data)`: `seq` is the gateway-wide
//! receive order, `data` the postcard [`Record`](crate::event::Record). Draining reads in
//! `seq` order, so per-device order holds. A row is deleted only after Kafka confirmed its
//! record. The router groups appends and deletes into one transaction (group commit): with
//! WAL and `synchronous=FULL` one fsync covers a whole batch.
//!
//! Opening checks integrity (`PRAGMA quick_check`); a corrupt file is moved aside
//! (`<name>.corrupt-<unix time>`, with its `-wal`/`-shm`) and a fresh spool started, so a
//! damaged SD card never puts the gateway into a crash loop. The schema is versioned with
//! `PRAGMA user_version`; [`MIGRATIONS`] brings older files up to date.

use std::io::Write;
use std::path::{Path, PathBuf};

use gateway_config::Synchronous;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use crate::event::Record;

pub mod reserve;
pub use reserve::Reserve;

/// Schema migrations; entry `i` upgrades `user_version` `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &["
    CREATE TABLE spool (
        seq    INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        data   BLOB NOT NULL
    );
    CREATE TABLE quarantine (
        seq    INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        data   BLOB NOT NULL,
        reason TEXT NOT NULL,
        at     INTEGER NOT NULL
    );
"];

/// Spool errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The disk (or the file system quota) is full.
    #[error("the disk holding the spool is full: {0}")]
    DiskFull(rusqlite::Error),
    /// The file is damaged.
    #[error("the spool file is corrupt: {0}")]
    Corrupt(String),
    /// The file system does not take SQLite's write-ahead log (no shared memory, as on
    /// some network file systems). The file is not damaged: it is not moved aside.
    #[error("the spool cannot use a write-ahead log here (journal_mode={0}); put spool.path on a local file system")]
    NoWal(String),
    /// The file was written by a newer gateway.
    #[error("the spool schema version {0} is newer than this gateway knows ({1}); upgrade the gateway or move the file")]
    TooNew(i64, usize),
    /// Any other SQLite error.
    #[error("spool database error: {0}")]
    Sqlite(rusqlite::Error),
    /// File system error around the spool (creating the directory, quarantining).
    #[error("spool file error: {0}")]
    Io(#[from] std::io::Error),
}

impl SpoolError {
    /// Whether the same operation may succeed later without anyone changing the config:
    /// a full disk, or an I/O error (opening a spool on a full disk fails with one:
    /// SQLite cannot size the WAL's shared-memory file).
    pub fn may_pass(&self) -> bool {
        match self {
            SpoolError::DiskFull(_) => true,
            SpoolError::Sqlite(e) => e.sqlite_error_code() == Some(ErrorCode::SystemIoFailure),
            SpoolError::Io(e) => e.kind() == std::io::ErrorKind::StorageFull,
            SpoolError::Corrupt(_) | SpoolError::NoWal(_) | SpoolError::TooNew(..) => false,
        }
    }
}

impl From<rusqlite::Error> for SpoolError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => SpoolError::DiskFull(e),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                SpoolError::Corrupt(e.to_string())
            }
            _ => SpoolError::Sqlite(e),
        }
    }
}

/// One spooled record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Receive order.
    pub seq: u64,
    /// Input name.
    pub source: String,
    /// postcard bytes of the record.
    pub data: Vec<u8>,
}

/// What happened when the spool was opened.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// Where a corrupt file was moved, if one was.
    pub quarantined: Option<PathBuf>,
    /// Why it was.
    pub reason: Option<String>,
}

/// An open spool.
pub struct Spool {
    conn: Connection,
    path: PathBuf,
    rows: u64,
    bytes: u64,
    max_seq: u64,
    /// Bytes of record data in the quarantine table.
    quarantine_bytes: u64,
}

/// A record Kafka refused for good, for the quarantine table (see [`Spool::write_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The record's seq (unique with the spool's: they come from one counter).
    pub seq: u64,
    /// Input name.
    pub source: String,
    /// postcard bytes of the record.
    pub data: Vec<u8>,
    /// Why it was set aside.
    pub reason: String,
}

/// Spool statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Rows waiting.
    pub rows: u64,
    /// Bytes of record data waiting.
    pub bytes: u64,
    /// Oldest and newest seq.
    pub seq_range: Option<(u64, u64)>,
    /// Rows per input.
    pub per_source: Vec<(String, u64)>,
    /// Rows moved to the quarantine table.
    pub quarantined_rows: u64,
    /// Schema version.
    pub schema_version: i64,
    /// File size (database + WAL).
    pub file_bytes: u64,
}

fn configure(conn: &Connection, sync: Synchronous) -> Result<(), SpoolError> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SpoolError::NoWal(mode));
    }
    let sync = match sync {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
        Synchronous::Off => "OFF",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous={sync}; PRAGMA journal_size_limit=67108864; PRAGMA temp_store=MEMORY;"
    ))?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), SpoolError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version as usize > MIGRATIONS.len() {
        return Err(SpoolError::TooNew(version, MIGRATIONS.len()));
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(m)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

fn check_integrity(conn: &Connection) -> Result<(), SpoolError> {
    let mut stmt = conn.prepare("PRAGMA quick_check")?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    if problems.len() == 1 && problems[0] == "ok" {
        Ok(())
    } else {
        Err(SpoolError::Corrupt(problems.join("; ")))
    }
}

fn open_checked(path: &Path, sync: Synchronous) -> Result<Connection, SpoolError> {
    let mut conn = Connection::open(path)?;
    configure(&conn, sync)?;
    check_integrity(&conn)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// The file [`Spool::mark_corrupt`] leaves beside the spool.
fn corrupt_marker(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.corrupt-at-run", path.display()))
}

/// A row as `gateway spool export` writes it: the record in the Kafka value schema plus
/// `seq`, or, for bytes that do not decode, `seq`, `source` and the `error`.
fn export_line(r: &Row) -> serde_json::Value {
    match Record::decode(&r.data) {
        Ok(rec) => {
            let mut v = crate::sinks::kafka::record_json(&rec);
            if let Some(o) = v.as_object_mut() {
                o.insert("seq".into(), r.seq.into());
            }
            v
        }
        Err(e) => serde_json::json!({"seq": r.seq, "source": r.source, "error": e.to_string()}),
    }
}

/// A text cell as a string, whatever a damaged page made of it: invalid UTF-8 is
/// replaced, and a cell of another type reads as empty. A row with such a cell is not
/// one the spool can refuse to read: it would hold up the drain, the overflow policy
/// and the commands for good.
fn text_lossy(v: rusqlite::types::ValueRef<'_>) -> String {
    match v {
        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
            String::from_utf8_lossy(t).into_owned()
        }
        _ => String::new(),
    }
}

/// A blob cell's bytes; a cell of another type reads as empty (and so fails to decode
/// as a record, which quarantines the row).
fn bytes_of(v: rusqlite::types::ValueRef<'_>) -> Vec<u8> {
    match v {
        rusqlite::types::ValueRef::Blob(b) => b.to_vec(),
        _ => Vec::new(),
    }
}

/// The file [`quarantine_file`] writes before it moves anything: the suffix of the name the
/// spool goes to, so that a move cut short (a kill or power loss between the renames) is
/// finished by the next open. Without it, a `-wal` left behind would be replayed into the
/// fresh spool, and the moved file would lack its last commits.
fn quarantine_intent(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.quarantine-to", path.display()))
}

/// `path` moved aside under `suffix`, plus `extra` (`""`, `"-wal"` or `"-shm"`).
fn quarantined_name(path: &Path, suffix: &str, extra: &str) -> PathBuf {
    PathBuf::from(format!("{}.corrupt-{suffix}{extra}", path.display()))
}

/// The directory a file's path is in (`.` for a bare file name).
fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Makes the directory's entries (renames, new and removed files) durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir_of(path))?.sync_all()
}

/// Moves a damaged spool (and its WAL and SHM files) aside; returns the new name.
///
/// Crash-safe: the target is recorded first ([`quarantine_intent`]), and
/// [`resume_quarantine`] completes the renames if they were cut short.
pub fn quarantine_file(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut suffix = stamp.to_string();
    let mut n = 1;
    while ["", "-wal", "-shm"]
        .iter()
        .any(|extra| quarantined_name(path, &suffix, extra).exists())
    {
        suffix = format!("{stamp}-{n}");
        n += 1;
    }
    let intent = quarantine_intent(path);
    {
        let mut f = std::fs::File::create(&intent)?;
        f.write_all(suffix.as_bytes())?;
        f.sync_all()?;
    }
    sync_dir(path)?;
    finish_quarantine(path, &suffix)
}

/// Renames whatever of the spool's files is still in place to the `suffix` names, makes
/// that durable, and removes the intent.
fn finish_quarantine(path: &Path, suffix: &str) -> std::io::Result<PathBuf> {
    for extra in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{extra}", path.display()));
        match std::fs::rename(&from, quarantined_name(path, suffix, extra)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    sync_dir(path)?;
    std::fs::remove_file(quarantine_intent(path))?;
    // The intent's removal made durable too: one that came back after a power loss
    // would find the fresh spool in place (`resume_quarantine` also checks for that).
    sync_dir(path)?;
    Ok(quarantined_name(path, suffix, ""))
}

/// Finishes a quarantine that a kill or power loss cut short; returns the moved file's
/// name if there was one. An intent that is empty or not ours (it was being written when
/// the process died, so nothing was moved yet) is removed: the open's own check decides
/// again.
fn resume_quarantine(path: &Path) -> std::io::Result<Option<PathBuf>> {
    let intent = quarantine_intent(path);
    let suffix = match std::fs::read_to_string(&intent) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => String::new(),
        Err(e) => return Err(e),
    };
    let ours = !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit() || b == b'-');
    // The main file moved and a spool is in its place again: the move was finished and a
    // fresh spool made, only the intent's removal was lost. Moving that spool aside
    // would take its rows out of the drain.
    let stale = path.exists() && quarantined_name(path, &suffix, "").exists();
    if !ours || stale {
        std::fs::remove_file(&intent)?;
        sync_dir(path)?;
        return Ok(None);
    }
    finish_quarantine(path, &suffix).map(Some)
}

impl Spool {
    /// Opens (or creates) the spool. A corrupt file is quarantined and a fresh one made.
    pub fn open(path: &Path, sync: Synchronous) -> Result<(Spool, OpenReport), SpoolError> {
        let mut report = OpenReport::default();
        let spool = Spool::open_reporting(path, sync, &mut report)?;
        Ok((spool, report))
    }

    /// [`Spool::open`] that records what it did in `report` even when it fails: a
    /// corrupt file moved aside before the fresh spool could not be made (a full disk) is
    /// still reported by the attempt that succeeds later with the same `report`.
    pub fn open_reporting(
        path: &Path,
        sync: Synchronous,
        report: &mut OpenReport,
    ) -> Result<Spool, SpoolError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // Left by a run that found the file corrupt (`mark_corrupt`): the start's quick
        // check may not see that damage, and trusting it would exit again, in a loop.
        if let Some(moved) = resume_quarantine(path)? {
            tracing::error!(spool = %path.display(), moved_to = %moved.display(),
                "finished moving a corrupt spool aside, which the last run had begun when it stopped");
            report.quarantined = Some(moved);
            report.reason = Some("moving it aside was cut short by a stop".into());
        }
        let marker = corrupt_marker(path);
        let checked = if marker.exists() && path.exists() {
            Err(SpoolError::Corrupt(
                "SQLite found it corrupt while the gateway ran".into(),
            ))
        } else {
            open_checked(path, sync)
        };
        let conn = match checked {
            Ok(c) => c,
            Err(SpoolError::Corrupt(why)) => {
                let moved = quarantine_file(path)?;
                tracing::error!(spool = %path.display(), moved_to = %moved.display(), reason = %why,
                    "the spool file is corrupt; moved it aside and started a fresh spool");
                report.quarantined = Some(moved);
                report.reason = Some(why);
                open_checked(path, sync)?
            }
            Err(e) => return Err(e),
        };
        if marker.exists() {
            // Gone for good before anything is acknowledged from this spool: a marker
            // that came back after a power loss would move a healthy spool aside.
            std::fs::remove_file(&marker)?;
            sync_dir(&marker)?;
        }
        Spool::with_counts(conn, path)
    }

    /// Records that SQLite found this spool corrupt while running, so that the next open
    /// moves it aside whatever its quick check says.
    pub fn mark_corrupt(&self) -> std::io::Result<()> {
        // Durable before the exit that follows: without it a power loss could take it
        // back, and the next start would find the damage again and again.
        let marker = corrupt_marker(&self.path);
        std::fs::File::create(&marker)?.sync_all()?;
        sync_dir(&marker)
    }

    /// Wraps an open connection, reading the row and byte counts and the highest seq.
    /// `max_seq` also covers quarantined rows, so new seqs never collide with them.
    fn with_counts(conn: Connection, path: &Path) -> Result<Spool, SpoolError> {
        let (rows, bytes, max_seq, quarantine_bytes): (i64, i64, i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(length(data)), 0),
                    max(coalesce(max(seq), 0), (SELECT coalesce(max(seq), 0) FROM quarantine)),
                    (SELECT coalesce(sum(length(data)), 0) FROM quarantine)
             FROM spool",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        Ok(Spool {
            conn,
            path: path.to_path_buf(),
            rows: rows as u64,
            bytes: bytes as u64,
            max_seq: max_seq as u64,
            quarantine_bytes: quarantine_bytes as u64,
        })
    }

    /// Opens an existing spool read-only, for inspection (`gateway spool ...`) beside a
    /// running gateway: no migration, no quarantine, nothing written.
    pub fn open_read_only(path: &Path) -> Result<Spool, SpoolError> {
        use rusqlite::OpenFlags;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version as usize != MIGRATIONS.len() {
            return Err(SpoolError::Corrupt(format!(
                "schema version {version}, this gateway reads {}",
                MIGRATIONS.len()
            )));
        }
        Spool::with_counts(conn, path)
    }

    /// Rows waiting.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes of record data waiting.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The highest seq ever stored in this file (0 when empty).
    pub fn max_seq(&self) -> u64 {
        self.max_seq
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends rows and deletes confirmed seqs, in one transaction. Returns the number of
    /// rows actually deleted.
    pub fn write(&mut self, appends: &[Row], deletes: &[u64]) -> Result<u64, SpoolError> {
        self.write_with(appends, deletes, &[])
    }

    /// [`Spool::write`], also putting `quarantine` in the quarantine table, in the same
    /// transaction (one commit for a burst of refused records, not one each).
    pub fn write_with(
        &mut self,
        appends: &[Row],
        deletes: &[u64],
        quarantine: &[Quarantined],
    ) -> Result<u64, SpoolError> {
        let tx = self.conn.transaction()?;
        let mut added_bytes = 0u64;
        let mut removed = (0u64, 0u64);
        let mut quarantined = 0u64;
        {
            if !quarantine.is_empty() {
                let mut q = tx.prepare_cached(
                    "INSERT OR REPLACE INTO quarantine (seq, source, data, reason, at) VALUES (?1, ?2, ?3, ?4, unixepoch())",
                )?;
                for r in quarantine {
                    q.execute(params![r.seq as i64, r.source, r.data, r.reason])?;
                    quarantined += r.data.len() as u64;
                }
            }
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO spool (seq, source, data) VALUES (?1, ?2, ?3)",
            )?;
            for r in appends {
                ins.execute(params![r.seq as i64, r.source, r.data])?;
                added_bytes += r.data.len() as u64;
            }
            let mut del = tx.prepare_cached(
                "DELETE FROM spool WHERE seq = ?1 RETURNING coalesce(length(data), 0)",
            )?;
            for seq in deletes {
                let len: Option<i64> = del.query_row([*seq as i64], |r| r.get(0)).optional()?;
                if let Some(len) = len {
                    removed.0 += 1;
                    removed.1 += len as u64;
                }
            }
        }
        tx.commit()?;
        self.rows = self.rows + appends.len() as u64 - removed.0;
        self.bytes = self.bytes + added_bytes - removed.1;
        self.quarantine_bytes += quarantined;
        if let Some(m) = appends.iter().map(|r| r.seq).max() {
            self.max_seq = self.max_seq.max(m);
        }
        Ok(removed.0)
    }

    /// Bytes of free pages inside the file (rows deleted since it last shrank): what
    /// new rows can take without the file growing.
    pub fn free_bytes(&self) -> Result<u64, SpoolError> {
        let (free, page): (i64, i64) = self.conn.query_row(
            "SELECT freelist_count, page_size FROM pragma_freelist_count(), pragma_page_size()",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((free.max(0) as u64).saturating_mul(page.max(0) as u64))
    }

    /// Gives the file's free pages back to the file system: `VACUUM`, then a checkpoint
    /// that truncates the WAL. Takes as long as copying what is left; the router calls it
    /// only once the spool is empty.
    pub fn compact(&mut self) -> Result<(), SpoolError> {
        self.conn.execute_batch("VACUUM")?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Up to `limit` rows with `seq > after`, in seq order.
    pub fn read_after(&mut self, after: u64, limit: usize) -> Result<Vec<Row>, SpoolError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, source, data FROM spool WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![after as i64, limit as i64], |r| {
                Ok(Row {
                    seq: r.get::<_, i64>(0)? as u64,
                    source: text_lossy(r.get_ref(1)?),
                    data: bytes_of(r.get_ref(2)?),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Deletes the oldest rows with `seq > after`, except those `keep` names, until at
    /// least `need` bytes are freed (or nothing is left). Returns `(seq, source)` of every
    /// row dropped, so every drop can be counted.
    pub fn drop_oldest(
        &mut self,
        after: u64,
        need: u64,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, String, bool)>, SpoolError> {
        let tx = self.conn.transaction()?;
        let mut freed = 0u64;
        let mut dropped: Vec<(u64, String, bool)> = Vec::new();
        let mut count = 0u64;
        {
            let mut sel = tx.prepare_cached(
                "SELECT seq, source, coalesce(length(data), 0), substr(data, 1, 1) FROM spool WHERE seq > ?1 ORDER BY seq LIMIT 256",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM spool WHERE seq = ?1")?;
            let mut cursor = after;
            while freed < need {
                let batch: Vec<(i64, String, i64, Vec<u8>)> = sel
                    .query_map([cursor as i64], |r| {
                        Ok((
                            r.get(0)?,
                            text_lossy(r.get_ref(1)?),
                            r.get(2)?,
                            bytes_of(r.get_ref(3)?),
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                if batch.is_empty() {
                    break;
                }
                for (seq, source, len, head) in batch {
                    if freed >= need {
                        break;
                    }
                    cursor = seq as u64;
                    if keep(seq as u64) {
                        continue;
                    }
                    del.execute([seq])?;
                    freed += len as u64;
                    count += 1;
                    dropped.push((seq as u64, source, !Record::is_dead_letter(&head)));
                }
            }
        }
        tx.commit()?;
        self.rows -= count;
        self.bytes -= freed;
        Ok(dropped)
    }

    /// Moves a row that cannot be decoded to the quarantine table.
    pub fn quarantine_row(&mut self, seq: u64, reason: &str) -> Result<(), SpoolError> {
        self.quarantine_rows(&[(seq, reason.to_string())], u64::MAX)
            .map(|_| ())
    }

    /// Moves rows (seq, reason) to the quarantine table, in one transaction: a topic
    /// set aside with a backlog is one commit per batch of reports, not one per row.
    /// Rows no longer in the spool are passed over; a row that would take the table's
    /// bytes past `limit` is not moved, and its seq is returned (the caller deletes it).
    pub fn quarantine_rows(
        &mut self,
        rows: &[(u64, String)],
        limit: u64,
    ) -> Result<Vec<u64>, SpoolError> {
        let tx = self.conn.transaction()?;
        let (mut moved, mut moved_bytes) = (0u64, 0u64);
        let mut no_room = Vec::new();
        {
            let mut len_of =
                tx.prepare_cached("SELECT coalesce(length(data), 0) FROM spool WHERE seq = ?1")?;
            let mut copy = tx.prepare_cached(
                "INSERT OR REPLACE INTO quarantine (seq, source, data, reason, at) SELECT seq, source, data, ?2, unixepoch() FROM spool WHERE seq = ?1",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM spool WHERE seq = ?1")?;
            for (seq, reason) in rows {
                let len: Option<i64> = len_of.query_row([*seq as i64], |r| r.get(0)).optional()?;
                let Some(len) = len else {
                    continue;
                };
                if self.quarantine_bytes + moved_bytes + len as u64 > limit {
                    no_room.push(*seq);
                    continue;
                }
                copy.execute(params![*seq as i64, reason])?;
                delete.execute([*seq as i64])?;
                moved += 1;
                moved_bytes += len as u64;
            }
        }
        tx.commit()?;
        self.rows -= moved;
        self.bytes -= moved_bytes;
        self.quarantine_bytes += moved_bytes;
        Ok(no_room)
    }

    /// Bytes of record data in the quarantine table.
    pub fn quarantine_bytes(&self) -> u64 {
        self.quarantine_bytes
    }

    /// Statistics.
    pub fn stats(&self) -> Result<Stats, SpoolError> {
        let seq_range: Option<(i64, i64)> =
            self.conn
                .query_row("SELECT min(seq), max(seq) FROM spool", [], |r| {
                    Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
                })?;
        let mut stmt = self
            .conn
            .prepare("SELECT source, count(*) FROM spool GROUP BY source ORDER BY source")?;
        let per_source = stmt
            .query_map([], |r| {
                Ok((text_lossy(r.get_ref(0)?), r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<_, _>>()?;
        let quarantined_rows: i64 =
            self.conn
                .query_row("SELECT count(*) FROM quarantine", [], |r| r.get(0))?;
        let schema_version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let file_bytes = [String::new(), "-wal".into()]
            .iter()
            .filter_map(|s| std::fs::metadata(format!("{}{s}", self.path.display())).ok())
            .map(|m| m.len())
            .sum();
        Ok(Stats {
            rows: self.rows,
            bytes: self.bytes,
            seq_range: seq_range.map(|(a, b)| (a as u64, b as u64)),
            per_source,
            quarantined_rows: quarantined_rows as u64,
            schema_version,
            file_bytes,
        })
    }

    /// The highest seq in the spool table now (0 when empty): where `check` and `export`
    /// stop, so that a running gateway that spools faster than they read does not keep
    /// them going for ever.
    fn newest_seq(&self) -> Result<u64, SpoolError> {
        let seq: i64 = self
            .conn
            .query_row("SELECT coalesce(max(seq), 0) FROM spool", [], |r| r.get(0))?;
        Ok(seq as u64)
    }

    /// Full integrity check (`PRAGMA integrity_check`) plus a decode of every row.
    /// Returns the problems found (empty: healthy).
    pub fn check(&mut self) -> Result<Vec<String>, SpoolError> {
        let mut problems: Vec<String> = {
            let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
            let v: Vec<String> = stmt
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            v.into_iter().filter(|p| p != "ok").collect()
        };
        let mut after = 0;
        let upto = self.newest_seq()?;
        while after < upto {
            let rows = self.read_after(after, 1000)?;
            let Some(last) = rows.last() else { break };
            after = last.seq;
            for r in rows.into_iter().filter(|r| r.seq <= upto) {
                if let Err(e) = Record::decode(&r.data) {
                    problems.push(format!("row {}: {e}", r.seq));
                }
            }
        }
        Ok(problems)
    }

    /// Writes every spooled record as one JSON line (the Kafka value schema, plus `seq`).
    pub fn export(&mut self, out: &mut dyn Write) -> Result<u64, anyhow::Error> {
        let mut after = 0;
        let mut n = 0;
        let upto = self.newest_seq()?;
        while after < upto {
            let rows = self.read_after(after, 1000)?;
            let Some(last) = rows.last() else { break };
            after = last.seq;
            for r in rows.into_iter().filter(|r| r.seq <= upto) {
                serde_json::to_writer(&mut *out, &export_line(&r))?;
                out.write_all(b"\n")?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Writes every row of the quarantine table as one JSON line: what [`Spool::export`]
    /// writes, plus `reason` and `at` (when it was set aside, Unix seconds).
    pub fn export_quarantined(&mut self, out: &mut dyn Write) -> Result<u64, anyhow::Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, source, data, reason, at FROM quarantine ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            let row = Row {
                seq: r.get::<_, i64>(0)? as u64,
                source: text_lossy(r.get_ref(1)?),
                data: bytes_of(r.get_ref(2)?),
            };
            let mut line = export_line(&row);
            if let Some(o) = line.as_object_mut() {
                o.insert("reason".into(), text_lossy(r.get_ref(3)?).into());
                o.insert("at".into(), r.get::<_, Option<i64>>(4)?.into());
            }
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
