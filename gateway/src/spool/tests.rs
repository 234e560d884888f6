use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn row(seq: u64, len: usize) -> Row {
    Row {
        seq,
        source: if seq % 2 == 0 { "a".into() } else { "b".into() },
        data: vec![(seq % 251) as u8; len],
    }
}

fn open(dir: &tempfile::TempDir) -> Spool {
    Spool::open(&dir.path().join("spool.sqlite"), Synchronous::Off)
        .expect("opens")
        .0
}

/// The seqs of up to `n` rows after `after`.
fn seqs_after(s: &mut Spool, after: u64, n: usize) -> Vec<u64> {
    s.read_after(after, n)
        .expect("read")
        .iter()
        .map(|r| r.seq)
        .collect()
}

#[test]
fn a_spool_marked_corrupt_while_running_is_moved_aside_at_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.sqlite");
    let mut s = open(&dir);
    s.write(&[row(1, 10), row(2, 20)], &[]).expect("write");
    s.mark_corrupt().expect("marker");
    drop(s);
    // The file itself passes every check: the marker alone moves it.
    let (s, report) = Spool::open(&path, Synchronous::Off).expect("opens");
    let moved = report.quarantined.expect("moved aside");
    assert_eq!(s.rows(), 0);
    assert!(!corrupt_marker(&path).exists(), "the marker is gone");
    let (old, _) = Spool::open(&moved, Synchronous::Off).expect("the moved file opens");
    assert_eq!(old.rows(), 2, "its rows kept");
    drop(s);
    let (_, again) = Spool::open(&path, Synchronous::Off).expect("opens");
    assert!(again.quarantined.is_none(), "once");
}

#[test]
fn a_quarantine_cut_short_is_finished_at_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("live.sqlite");
    let path = dir.path().join("spool.sqlite");
    let wal = |p: &Path| PathBuf::from(format!("{}-wal", p.display()));
    // A spool whose last commits are only in its WAL, copied as a crash would leave it.
    let mut s = Spool::open(&live, Synchronous::Full).expect("opens").0;
    s.write(&[row(1, 10), row(2, 20)], &[]).expect("write");
    std::fs::copy(&live, &path).expect("copy");
    std::fs::copy(wal(&live), wal(&path)).expect("copy wal");
    drop(s);
    // The move aside stopped after the main file's rename, the WAL still in place.
    std::fs::write(quarantine_intent(&path), b"1700000000").expect("intent");
    let target = quarantined_name(&path, "1700000000", "");
    std::fs::rename(&path, &target).expect("rename");

    let (s, report) = Spool::open(&path, Synchronous::Full).expect("opens");
    assert_eq!(report.quarantined.as_deref(), Some(target.as_path()));
    assert_eq!(
        s.rows(),
        0,
        "the old WAL was not replayed into the fresh spool"
    );
    assert!(!quarantine_intent(&path).exists(), "the intent is gone");
    drop(s);
    let (old, _) = Spool::open(&target, Synchronous::Full).expect("the moved file opens");
    assert_eq!(old.rows(), 2, "the moved file has its WAL's commits");
    let (_, again) = Spool::open(&path, Synchronous::Full).expect("opens");
    assert!(again.quarantined.is_none(), "once");
}

#[test]
fn an_intent_whose_move_was_finished_leaves_the_fresh_spool_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.sqlite");
    std::fs::write(
        quarantined_name(&path, "1700000000", ""),
        b"the corrupt one",
    )
    .expect("old");
    let mut s = Spool::open(&path, Synchronous::Off).expect("opens").0;
    s.write(&[row(1, 10)], &[]).expect("write");
    drop(s);
    // The intent's removal was lost with the power.
    std::fs::write(quarantine_intent(&path), b"1700000000").expect("intent");
    let (s, report) = Spool::open(&path, Synchronous::Off).expect("opens");
    assert!(report.quarantined.is_none());
    assert_eq!(s.rows(), 1, "the fresh spool keeps its rows");
    assert!(!quarantine_intent(&path).exists());
}

#[test]
fn an_intent_torn_before_any_move_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.sqlite");
    let mut s = Spool::open(&path, Synchronous::Off).expect("opens").0;
    s.write(&[row(1, 10)], &[]).expect("write");
    drop(s);
    std::fs::write(quarantine_intent(&path), b"").expect("intent");
    let (s, report) = Spool::open(&path, Synchronous::Off).expect("opens");
    assert!(report.quarantined.is_none());
    assert_eq!(s.rows(), 1, "a sound spool stays");
    assert!(!quarantine_intent(&path).exists());
}

#[test]
fn append_read_delete_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(&dir);
    s.write(&[row(1, 10), row(2, 20), row(3, 30)], &[])
        .expect("write");
    assert_eq!((s.rows(), s.bytes(), s.max_seq()), (3, 60, 3));
    let got = seqs_after(&mut s, 1, 10);
    assert_eq!(got, [2, 3]);
    assert_eq!(s.write(&[], &[1, 3, 99]).expect("delete"), 2);
    assert_eq!((s.rows(), s.bytes()), (1, 20));
    drop(s);
    let s = open(&dir);
    assert_eq!((s.rows(), s.bytes(), s.max_seq()), (1, 20, 2));
}

#[test]
fn drop_oldest_frees_bytes_and_reports_each_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(&dir);
    let rows: Vec<Row> = (1..=10).map(|i| row(i, 100)).collect();
    s.write(&rows, &[]).expect("write");
    // Rows up to seq 2 are being drained: never dropped.
    let dropped = s.drop_oldest(2, 250, |_| false).expect("drop");
    assert_eq!(dropped.iter().map(|d| d.0).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!((s.rows(), s.bytes()), (7, 700));
    let left = seqs_after(&mut s, 0, 100);
    assert_eq!(left, [1, 2, 6, 7, 8, 9, 10]);
}

#[test]
fn a_corrupt_file_is_quarantined_and_a_fresh_spool_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.sqlite");
    std::fs::write(
        &path,
        b"this is not a database, it is a damaged SD card sector......".repeat(100),
    )
    .expect("write");
    let (mut s, report) = Spool::open(&path, Synchronous::Full).expect("opens anyway");
    let moved = report.quarantined.expect("quarantined");
    assert!(moved.exists());
    assert!(moved
        .file_name()
        .expect("name")
        .to_string_lossy()
        .contains(".corrupt-"));
    assert_eq!(s.rows(), 0);
    s.write(&[row(1, 5)], &[]).expect("fresh spool works");
}

#[test]
fn a_damaged_page_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.sqlite");
    {
        let (mut s, _) = Spool::open(&path, Synchronous::Full).expect("opens");
        let rows: Vec<Row> = (1..=2000).map(|i| row(i, 200)).collect();
        s.write(&rows, &[]).expect("write");
        s.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .expect("checkpoint");
    }
    // Overwrite the middle of the file (table b-tree pages) with garbage.
    let mut bytes = std::fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 8192] {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).expect("write");
    let (s, report) = Spool::open(&path, Synchronous::Full).expect("opens anyway");
    assert!(report.quarantined.is_some(), "damage must be detected");
    assert_eq!(s.rows(), 0);
}

#[test]
fn undecodable_rows_go_to_quarantine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(&dir);
    s.write(&[row(1, 3)], &[]).expect("write");
    let mut out = Vec::new();
    s.export(&mut out).expect("export");
    assert!(String::from_utf8_lossy(&out).contains("\"error\""));
    assert_eq!(s.check().expect("check").len(), 1);
    s.quarantine_row(1, "bad").expect("quarantine");
    assert_eq!(s.rows(), 0);
    assert_eq!(s.stats().expect("stats").quarantined_rows, 1);
}

#[test]
fn rows_move_to_the_quarantine_together_and_missing_ones_are_passed_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(&dir);
    s.write(&[row(1, 10), row(2, 20), row(3, 30), row(4, 40)], &[])
        .expect("write");
    let moves: Vec<(u64, String)> = [2, 9, 4, 3]
        .iter()
        .map(|&q| (q, format!("refused {q}")))
        .collect();
    // Room for 2 and 4 (60 bytes), not for 3 as well.
    let no_room = s.quarantine_rows(&moves, 80).expect("quarantine");
    assert_eq!(no_room, [3]);
    assert_eq!((s.rows(), s.bytes(), s.quarantine_bytes()), (2, 40, 60));
    let left = seqs_after(&mut s, 0, 10);
    assert_eq!(left, [1, 3]);
    drop(s);
    let s = open(&dir);
    assert_eq!(
        (s.rows(), s.bytes(), s.quarantine_bytes()),
        (2, 40, 60),
        "the same at open"
    );
    assert_eq!(s.stats().expect("stats").quarantined_rows, 2);
}

#[test]
fn refused_records_go_to_the_quarantine_with_the_commit_and_export_with_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(&dir);
    let q = |seq: u64, len: usize| Quarantined {
        seq,
        source: "a".into(),
        data: vec![9; len],
        reason: format!("refused {seq}"),
    };
    s.write_with(&[row(1, 10)], &[], &[q(2, 30), q(3, 40)])
        .expect("write");
    assert_eq!(
        (s.rows(), s.bytes()),
        (1, 10),
        "the spool's counts are its own"
    );
    assert_eq!(s.quarantine_bytes(), 70);
    s.quarantine_row(1, "moved").expect("quarantine");
    assert_eq!(s.quarantine_bytes(), 80);
    drop(s);
    let mut s = open(&dir);
    assert_eq!(s.quarantine_bytes(), 80, "counted again at open");
    let mut out = Vec::new();
    assert_eq!(s.export_quarantined(&mut out).expect("export"), 3);
    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[0]["reason"], "moved");
    assert_eq!(lines[2]["reason"], "refused 3");
    assert!(lines[2]["at"].as_i64().is_some_and(|t| t > 1_700_000_000));
}

#[test]
fn cells_of_the_wrong_type_are_read_not_refused() {
    // A bit flip can leave a cell that is not UTF-8 text, or not a blob, where
    // quick_check does not look. Refusing to read the row held up the drain, the
    // overflow policy and the commands for good.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(&dir);
    s.write(&[row(1, 10), row(2, 20), row(3, 30)], &[])
        .expect("write");
    s.conn
        .execute_batch(
            "UPDATE spool SET source = X'FF61' WHERE seq = 1;
             UPDATE spool SET data = 'text, not a blob' WHERE seq = 2;
             UPDATE spool SET data = 7 WHERE seq = 3;",
        )
        .expect("damage");
    let rows = s.read_after(0, 10).expect("read");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].source, "\u{FFFD}a", "invalid UTF-8 replaced");
    assert!(
        rows[1].data.is_empty() && rows[2].data.is_empty(),
        "undecodable, so quarantined"
    );
    assert!(s.stats().is_ok());
    s.quarantine_row(3, "test")
        .expect("a number cell quarantines");
    let dropped = s
        .drop_oldest(0, 1, |_| false)
        .expect("drop_oldest reads them too");
    assert_eq!(dropped.first().map(|d| d.1.as_str()), Some("\u{FFFD}a"));
}

#[test]
fn migrations_refuse_a_newer_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool.sqlite");
    {
        let c = Connection::open(&path).expect("open");
        c.pragma_update(None, "user_version", 99).expect("set");
    }
    assert!(matches!(
        Spool::open(&path, Synchronous::Full),
        Err(SpoolError::TooNew(99, _))
    ));
}

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    /// Confirm the k-th oldest unconfirmed row.
    Confirm(u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..20).prop_map(Op::Append),
        3 => any::<u8>().prop_map(Op::Confirm),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any sequence of append / confirm / reopen keeps FIFO order and loses no
    /// unconfirmed row.
    #[test]
    fn fifo_and_no_loss(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = open(&dir);
        let mut model: BTreeMap<u64, Row> = BTreeMap::new();
        let mut next = 1u64;
        for o in ops {
            match o {
                Op::Append(n) => {
                    let rows: Vec<Row> = (0..n as u64).map(|i| row(next + i, (next + i) as usize % 50 + 1)).collect();
                    for r in &rows { model.insert(r.seq, r.clone()); }
                    next += n as u64;
                    s.write(&rows, &[]).expect("append");
                }
                Op::Confirm(k) => {
                    if let Some(seq) = model.keys().nth(k as usize % model.len().max(1)).copied() {
                        model.remove(&seq);
                        s.write(&[], &[seq]).expect("confirm");
                    }
                }
                Op::Reopen => {
                    drop(s);
                    s = open(&dir);
                }
            }
            // The rows themselves (seq, input and bytes), in order.
            let all = s.read_after(0, 100_000).expect("read");
            prop_assert_eq!(&all, &model.values().cloned().collect::<Vec<_>>());
            prop_assert_eq!(s.rows(), model.len() as u64);
            prop_assert_eq!(s.bytes(), model.values().map(|r| r.data.len() as u64).sum::<u64>());
        }
    }
}
