//! Unit tests of the store: what is written comes back, references are counted, the
//! message log is truncated as messages are settled, group commit batches, and the flush
//! modes keep their promises.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableHandle};

use super::log::{self, ChunkReader, ChunkWriter, Record};
use super::schema::{MESSAGE_BODIES, MESSAGE_LOG, META, META_SCHEMA_VERSION};
use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("warren-store-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(dir: &TempDir) -> (Store, Recovered) {
    Store::open(dir.path(), FlushMode::Sync, Duration::from_millis(100)).expect("open store")
}

/// Opens the store at `dir` cutting blobs as `trim` says.
fn open_trimmed(dir: &TempDir, trim: BlobTrim) -> (Store, Recovered) {
    Store::open_trimmed(
        dir.path(),
        FlushMode::Sync,
        Duration::from_millis(100),
        Some(trim),
    )
    .expect("open")
}

/// The head of the trimmed tests' blobs: everything up to and including the first ':'.
fn colon_head_len(blob: &[u8]) -> Option<usize> {
    Some(blob.iter().position(|&c| c == b':')? + 1)
}

fn reopen(store: Store, dir: &TempDir) -> Recovered {
    store.close();
    drop(store);
    let (store, recovered) = open(dir);
    store.close();
    recovered
}

/// Every chunk of the message log `(number, bytes)`, read directly (the store must be
/// closed).
fn stored_chunks(dir: &TempDir) -> Vec<(u64, Vec<u8>)> {
    stored_rows(dir, MESSAGE_LOG)
}

/// Every row `(number, bytes)` of a chunk table, read directly (the store must be
/// closed).
fn stored_rows(dir: &TempDir, table: redb::TableDefinition<u64, &[u8]>) -> Vec<(u64, Vec<u8>)> {
    let db = Database::open(dir.path().join(DB_FILE_NAME)).expect("open db");
    let txn = db.begin_read().expect("read txn");
    let table = txn.open_table(table).expect("chunk table");
    table
        .iter()
        .expect("iter")
        .map(|row| {
            let (k, v) = row.expect("row");
            (k.value(), v.value().to_vec())
        })
        .collect()
}

/// The names of the database's tables, read directly (the store must be closed).
fn table_names(dir: &TempDir) -> Vec<String> {
    let db = Database::open(dir.path().join(DB_FILE_NAME)).expect("open db");
    let txn = db.begin_read().expect("read txn");
    txn.list_tables()
        .expect("list tables")
        .map(|t| t.name().to_string())
        .collect()
}

/// Every row of the message log's bodies `(chunk number, bytes)`, read directly (the
/// store must be closed).
fn stored_bodies(dir: &TempDir) -> Vec<(u64, Vec<u8>)> {
    let db = Database::open(dir.path().join(DB_FILE_NAME)).expect("open db");
    let txn = db.begin_read().expect("read txn");
    let table = txn.open_table(MESSAGE_BODIES).expect("bodies");
    table
        .iter()
        .expect("iter")
        .map(|row| {
            let (k, v) = row.expect("row");
            (k.value(), v.value().to_vec())
        })
        .collect()
}

/// The msg ids whose blob is on disk (in some chunk), sorted, read directly (the store
/// must be closed).
fn stored_message_ids(dir: &TempDir) -> Vec<u64> {
    let mut ids = Vec::new();
    for (number, bytes) in stored_chunks(dir) {
        let mut reader = ChunkReader::new(number, &bytes).expect("chunk format");
        while let Some(record) = reader.next_record().expect("record") {
            if let Record::Put { msg_id, .. } = record {
                ids.push(msg_id);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn put(msg_id: u64, body: &'static [u8]) -> StoreOp {
    StoreOp::PutMessage {
        msg_id,
        blob: Bytes::from_static(body).into(),
    }
}

fn enqueue(queue: &str, offset: u64, msg_id: u64) -> StoreOp {
    StoreOp::Enqueue {
        queue: queue.into(),
        offset,
        msg_id,
    }
}

fn remove(queue: &str, offset: u64) -> StoreOp {
    StoreOp::Remove {
        queue: queue.into(),
        offset,
    }
}

/// The entries recovered for `queue` (none when it is absent).
fn entries(recovered: &Recovered, queue: &str) -> Vec<RecoveredEntry> {
    recovered
        .queues
        .get(queue)
        .map_or_else(Vec::new, |q| q.iter().collect())
}

/// A blob read back whole.
fn whole(bytes: &'static [u8]) -> RecoveredBlob {
    RecoveredBlob::Whole(Bytes::from_static(bytes))
}

/// The bytes of an entry read back whole.
fn bytes_of(entry: &RecoveredEntry) -> &[u8] {
    match &entry.blob {
        RecoveredBlob::Whole(blob) => blob,
        RecoveredBlob::OnDisk { .. } => panic!("entry {} was not read back whole", entry.offset),
    }
}

fn offsets(recovered: &Recovered, queue: &str) -> Vec<(u64, u64)> {
    recovered
        .queues
        .get(queue)
        .map_or_else(Vec::new, |entries| {
            entries.iter().map(|e| (e.offset, e.msg_id)).collect()
        })
}

#[test]
fn store_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Store>();
}

#[tokio::test]
async fn ops_are_recovered_after_reopen() {
    let dir = TempDir::new("reopen");
    let (store, recovered) = open(&dir);
    assert!(recovered.definitions.is_empty());
    assert!(recovered.queues.is_empty());
    assert_eq!(recovered.next_msg_id, 0);

    store
        .commit(vec![
            StoreOp::PutDefinition {
                key: "q/%2f/b".into(),
                value: b"queue b".to_vec(),
            },
            StoreOp::PutDefinition {
                key: "q/%2f/a".into(),
                value: b"queue a".to_vec(),
            },
            StoreOp::PutDefinition {
                key: "x/%2f/gone".into(),
                value: b"x".to_vec(),
            },
            put(7, b"seven"),
            enqueue("q/%2f/a", 2, 7),
            put(3, b"three"),
            enqueue("q/%2f/a", 1, 3),
            enqueue("q/%2f/b", 10, 3),
        ])
        .await;
    store
        .commit(vec![
            StoreOp::DeleteDefinition {
                key: "x/%2f/gone".into(),
            },
            StoreOp::PutDefinition {
                key: "q/%2f/a".into(),
                value: b"queue a v2".to_vec(),
            },
        ])
        .await;

    let recovered = reopen(store, &dir);
    assert_eq!(
        recovered.definitions,
        vec![
            ("q/%2f/a".to_string(), b"queue a v2".to_vec()),
            ("q/%2f/b".to_string(), b"queue b".to_vec()),
        ]
    );
    assert_eq!(offsets(&recovered, "q/%2f/a"), vec![(1, 3), (2, 7)]);
    assert_eq!(offsets(&recovered, "q/%2f/b"), vec![(10, 3)]);
    let a = &entries(&recovered, "q/%2f/a");
    assert_eq!(a[0].blob, whole(b"three"));
    assert_eq!(a[1].blob, whole(b"seven"));
    assert!(!a[0].delivered);
    assert_eq!(recovered.next_msg_id, 8);
}

#[tokio::test]
async fn shared_message_is_deleted_after_its_last_entry() {
    let dir = TempDir::new("shared");
    let (store, _) = open(&dir);
    store
        .commit(vec![
            put(1, b"shared"),
            enqueue("qa", 0, 1),
            enqueue("qb", 0, 1),
        ])
        .await;
    store.commit(vec![remove("qa", 0)]).await;

    let recovered = reopen(store, &dir);
    assert_eq!(offsets(&recovered, "qa"), vec![]);
    assert_eq!(offsets(&recovered, "qb"), vec![(0, 1)]);
    assert_eq!(entries(&recovered, "qb")[0].blob, whole(b"shared"));
    assert_eq!(stored_message_ids(&dir), vec![1]);

    let (store, _) = open(&dir);
    store.commit(vec![remove("qb", 0)]).await;
    let recovered = reopen(store, &dir);
    assert!(recovered.queues.is_empty());
    assert_eq!(stored_message_ids(&dir), Vec::<u64>::new());
    // Ids are not reused while a message exists; once none does, any id is fine.
    assert_eq!(recovered.next_msg_id, 0);
}

#[tokio::test]
async fn put_enqueue_remove_in_one_batch_leaves_nothing() {
    let dir = TempDir::new("one-batch");
    let (store, _) = open(&dir);
    store
        .commit(vec![
            put(5, b"short-lived"),
            enqueue("q", 0, 5),
            remove("q", 0),
        ])
        .await;
    let recovered = reopen(store, &dir);
    assert!(recovered.queues.is_empty());
    assert_eq!(stored_message_ids(&dir), Vec::<u64>::new());
    assert!(stored_chunks(&dir).is_empty(), "nothing live: no chunk");
}

#[tokio::test]
async fn moving_an_entry_within_a_batch_keeps_the_blob() {
    let dir = TempDir::new("move");
    let (store, _) = open(&dir);
    store
        .commit(vec![put(9, b"moved"), enqueue("src", 0, 9)])
        .await;
    // Remove first, then Enqueue elsewhere: the count touches zero mid-batch.
    store
        .commit(vec![remove("src", 0), enqueue("dlq", 4, 9)])
        .await;
    let recovered = reopen(store, &dir);
    assert_eq!(offsets(&recovered, "src"), vec![]);
    assert_eq!(offsets(&recovered, "dlq"), vec![(4, 9)]);
    assert_eq!(entries(&recovered, "dlq")[0].blob, whole(b"moved"));
}

#[tokio::test]
async fn replacing_an_entry_releases_the_old_message() {
    let dir = TempDir::new("replace");
    let (store, _) = open(&dir);
    store.commit(vec![put(1, b"old"), enqueue("q", 0, 1)]).await;
    store.commit(vec![put(2, b"new"), enqueue("q", 0, 2)]).await;
    let recovered = reopen(store, &dir);
    assert_eq!(offsets(&recovered, "q"), vec![(0, 2)]);
    assert_eq!(stored_message_ids(&dir), vec![2]);
}

#[tokio::test]
async fn mark_delivered_comes_back_as_delivered() {
    let dir = TempDir::new("delivered");
    let (store, _) = open(&dir);
    store
        .commit(vec![
            put(1, b"m1"),
            enqueue("q", 0, 1),
            put(2, b"m2"),
            enqueue("q", 1, 2),
        ])
        .await;
    store.submit(vec![StoreOp::MarkDelivered {
        queue: "q".into(),
        offset: 0,
    }]);
    store.submit(vec![
        StoreOp::MarkDelivered {
            queue: "q".into(),
            offset: 0,
        },
        // Absent entries are ignored.
        StoreOp::MarkDelivered {
            queue: "q".into(),
            offset: 99,
        },
    ]);
    let recovered = reopen(store, &dir);
    let q = &entries(&recovered, "q");
    assert_eq!(q.len(), 2);
    assert!(q[0].delivered);
    assert_eq!(q[0].delivery_count, 2);
    assert!(!q[1].delivered);
    assert_eq!(q[1].delivery_count, 0);
}

#[tokio::test]
async fn purge_queue_removes_entries_and_unreferenced_blobs() {
    let dir = TempDir::new("purge");
    let (store, _) = open(&dir);
    store
        .commit(vec![
            put(1, b"only in a"),
            enqueue("a", 0, 1),
            put(2, b"in a and b"),
            enqueue("a", 1, 2),
            enqueue("b", 0, 2),
            put(3, b"only in ab"),
            // A queue whose key extends "a" must not be touched.
            enqueue("ab", 0, 3),
        ])
        .await;
    store
        .commit(vec![StoreOp::PurgeQueue { queue: "a".into() }])
        .await;
    let recovered = reopen(store, &dir);
    assert_eq!(offsets(&recovered, "a"), vec![]);
    assert_eq!(offsets(&recovered, "b"), vec![(0, 2)]);
    assert_eq!(offsets(&recovered, "ab"), vec![(0, 3)]);
    // Message 1 is dead; its chunk stays while 2 and 3 live in it.
    assert_eq!(stored_message_ids(&dir), vec![1, 2, 3]);

    let (store, _) = open(&dir);
    store
        .commit(vec![
            StoreOp::PurgeQueue { queue: "b".into() },
            StoreOp::PurgeQueue { queue: "ab".into() },
        ])
        .await;
    let recovered = reopen(store, &dir);
    assert!(recovered.queues.is_empty());
    assert!(
        stored_chunks(&dir).is_empty(),
        "every chunk settled: none left"
    );
}

#[tokio::test]
async fn unreferenced_messages_are_not_recovered_and_go_with_their_chunk() {
    let dir = TempDir::new("orphan");
    let (store, _) = open(&dir);
    store.commit(vec![put(1, b"never enqueued")]).await;
    store.close();
    assert_eq!(
        stored_message_ids(&dir),
        Vec::<u64>::new(),
        "alone: not written"
    );

    let (store, _) = open(&dir);
    store
        .commit(vec![
            put(2, b"never enqueued"),
            put(3, b"kept"),
            enqueue("q", 0, 3),
        ])
        .await;
    let recovered = reopen(store, &dir);
    assert_eq!(offsets(&recovered, "q"), vec![(0, 3)]);
    assert_eq!(stored_message_ids(&dir), vec![2, 3]);

    let (store, _) = open(&dir);
    store.commit(vec![remove("q", 0)]).await;
    let recovered = reopen(store, &dir);
    assert!(recovered.queues.is_empty());
    assert_eq!(stored_message_ids(&dir), Vec::<u64>::new());
}

#[tokio::test]
async fn enqueue_of_an_unknown_message_is_not_written() {
    let dir = TempDir::new("unknown");
    let (store, _) = open(&dir);
    store.commit(vec![enqueue("q", 0, 42)]).await;
    let recovered = reopen(store, &dir);
    assert!(recovered.queues.is_empty());
    assert!(stored_chunks(&dir).is_empty());
}

#[tokio::test]
async fn entries_without_their_message_are_dropped_at_open() {
    let dir = TempDir::new("dangling");
    let (store, _) = open(&dir);
    store
        .commit(vec![put(1, b"kept"), enqueue("q", 0, 1)])
        .await;
    store.close();
    {
        // Damage the database behind the store's back: an entry naming no message.
        let mut chunk = ChunkWriter::default();
        chunk.enqueue(0, "q", 1, 77, 0);
        let db = Database::open(dir.path().join(DB_FILE_NAME)).expect("open db");
        let txn = db.begin_write().expect("write txn");
        txn.open_table(MESSAGE_LOG)
            .expect("message log")
            .insert(1000, chunk.bytes())
            .expect("insert");
        txn.commit().expect("commit");
    }
    let replayed = log::replay(chunks_as_bytes(&dir)).expect("replay");
    assert_eq!(replayed.dangling, vec![("q".to_string(), 1)]);
    let (store, recovered) = open(&dir);
    store.close();
    assert_eq!(offsets(&recovered, "q"), vec![(0, 1)]);
    let replayed = log::replay(chunks_as_bytes(&dir)).expect("replay");
    assert!(replayed.dangling.is_empty(), "settled at the first open");
}

fn chunks_as_bytes(dir: &TempDir) -> Vec<(u64, Bytes)> {
    stored_chunks(dir)
        .into_iter()
        .map(|(n, b)| (n, Bytes::from(b)))
        .collect()
}

/// Sets the stored schema version of the (closed) store at `dir` to `version`, and
/// writes what `more` writes, in one transaction.
fn stamp_schema_version(dir: &TempDir, version: u64, more: impl FnOnce(&redb::WriteTransaction)) {
    let db = Database::open(dir.path().join(DB_FILE_NAME)).expect("open db");
    let txn = db.begin_write().expect("write txn");
    txn.open_table(META)
        .expect("meta")
        .insert(META_SCHEMA_VERSION, version)
        .expect("insert");
    more(&txn);
    txn.commit().expect("commit");
}

#[tokio::test]
async fn unknown_schema_version_is_refused() {
    let dir = TempDir::new("schema");
    let (store, _) = open(&dir);
    store.close();
    stamp_schema_version(&dir, 99, |_| {});
    let err = Store::open(dir.path(), FlushMode::Sync, Duration::from_millis(100))
        .expect_err("version 99 must be refused");
    assert!(format!("{err:#}").contains("schema version 99"), "{err:#}");
}

#[tokio::test]
async fn many_and_sparse_messages_are_recovered() {
    let dir = TempDir::new("many");
    let (store, _) = open(&dir);
    // Enough messages for recovery to split the scan over threads, with dense ids.
    let mut ops = Vec::new();
    for i in 0..25_000u64 {
        ops.push(StoreOp::PutMessage {
            msg_id: 1000 + i,
            blob: Bytes::from(i.to_le_bytes().to_vec()).into(),
        });
        ops.push(enqueue(["a", "b", "c"][(i % 3) as usize], i, 1000 + i));
    }
    store.commit(ops).await;
    let recovered = reopen(store, &dir);
    assert_eq!(recovered.next_msg_id, 26_000);
    for queue in recovered.queues.keys() {
        let entries = entries(&recovered, queue);
        assert_eq!(entries.len(), if queue == "a" { 8334 } else { 8333 });
        assert!(entries.windows(2).all(|w| w[0].offset < w[1].offset));
        for e in &entries {
            assert_eq!(bytes_of(e), (e.msg_id - 1000).to_le_bytes());
            assert_eq!(e.offset, e.msg_id - 1000);
        }
    }

    // Sparse ids: lookups go through binary search.
    let dir = TempDir::new("sparse");
    let (store, _) = open(&dir);
    store
        .commit(vec![
            put(u64::MAX - 1, b"high"),
            enqueue("q", 0, u64::MAX - 1),
            put(5, b"low"),
            enqueue("q", 1, 5),
            put(1 << 40, b"mid"),
            enqueue("q", 2, 1 << 40),
        ])
        .await;
    let recovered = reopen(store, &dir);
    assert_eq!(recovered.next_msg_id, u64::MAX);
    let entries = entries(&recovered, "q");
    let blobs: Vec<&[u8]> = entries.iter().map(bytes_of).collect();
    assert_eq!(blobs, vec![&b"high"[..], b"low", b"mid"]);
}

#[tokio::test]
async fn a_flood_of_requests_is_split_into_bounded_transactions() {
    let dir = TempDir::new("caps");
    let (store, _) = open(&dir);
    let before = store.stats();
    let resume = store.pause();
    let n = super::writer::MAX_BATCH_REQUESTS + 10;
    for i in 0..n {
        store.submit(vec![StoreOp::PutDefinition {
            key: format!("k{i}"),
            value: vec![],
        }]);
    }
    drop(resume);
    store.commit(vec![]).await;
    let after = store.stats();
    assert_eq!(after.requests - before.requests, n as u64 + 1);
    assert_eq!(after.transactions - before.transactions, 2);
    store.close();
}

#[tokio::test]
async fn group_commit_puts_queued_requests_in_one_transaction() {
    let dir = TempDir::new("group");
    let (store, _) = open(&dir);
    let before = store.stats();
    let resume = store.pause();

    const N: u64 = 200;
    let mut waiters = Vec::new();
    for i in 0..N {
        waiters.push(tokio::spawn(
            store.commit(vec![put(i, b"body"), enqueue("q", i, i)]),
        ));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    store.commit_then(
        vec![],
        Box::new(move || {
            let _ = tx.send(());
        }),
    );
    store.submit(vec![remove("q", 0)]);
    drop(resume);
    for waiter in waiters {
        waiter.await.expect("commit task");
    }
    rx.recv_timeout(Duration::from_secs(10))
        .expect("commit_then callback");

    let after = store.stats();
    assert_eq!(after.requests - before.requests, N + 2);
    assert_eq!(after.transactions - before.transactions, 1);
    assert_eq!(after.durable_commits - before.durable_commits, 1);
    let recovered = reopen(store, &dir);
    assert_eq!(recovered.queues["q"].len(), N as usize - 1);
}

#[tokio::test]
async fn concurrent_commits_share_transactions() {
    let dir = TempDir::new("concurrent");
    let (store, _) = open(&dir);
    let before = store.stats();
    const N: u64 = 2000;
    let mut tasks = Vec::new();
    for i in 0..N {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .commit(vec![put(i, b"body"), enqueue("q", i, i)])
                .await;
        }));
    }
    for task in tasks {
        task.await.expect("commit task");
    }
    let after = store.stats();
    assert_eq!(after.requests - before.requests, N);
    let transactions = after.transactions - before.transactions;
    assert!(
        transactions < N,
        "{transactions} transactions for {N} requests"
    );
    let recovered = reopen(store, &dir);
    assert_eq!(recovered.queues["q"].len(), N as usize);
}

#[tokio::test]
async fn interval_mode_commits_then_fsyncs_on_the_timer() {
    let dir = TempDir::new("interval");
    // Long enough that the test is not descheduled past it between two statements.
    let interval = Duration::from_millis(300);
    let (store, _) = Store::open(dir.path(), FlushMode::Interval, interval).expect("open");
    let before = store.stats();
    store.commit(vec![put(1, b"m"), enqueue("q", 0, 1)]).await;
    let after_commit = store.stats();
    assert_eq!(after_commit.transactions - before.transactions, 1);
    assert_eq!(after_commit.durable_commits, before.durable_commits);

    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().durable_commits == before.durable_commits {
        assert!(Instant::now() < deadline, "no fsync after the interval");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Idle and synced: no further commits.
    let synced = store.stats();
    tokio::time::sleep(interval * 2).await;
    assert_eq!(store.stats(), synced);

    store.commit(vec![put(2, b"n"), enqueue("q", 1, 2)]).await;
    // close() fsyncs what the timer has not yet.
    let recovered = reopen(store, &dir);
    assert_eq!(offsets(&recovered, "q"), vec![(0, 1), (1, 2)]);
}

#[tokio::test]
async fn sync_mode_fsyncs_what_someone_waits_for_and_the_rest_within_the_interval() {
    let dir = TempDir::new("sync-unwaited");
    let interval = Duration::from_millis(300);
    let (store, _) = Store::open(dir.path(), FlushMode::Sync, interval).expect("open");
    let before = store.stats();
    store.commit(vec![put(1, b"m"), enqueue("q", 0, 1)]).await;
    let waited = store.stats();
    assert_eq!(waited.durable_commits - before.durable_commits, 1);

    // An ack no one waits for: committed at once, fsynced on the timer.
    store.submit(vec![remove("q", 0)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().transactions == waited.transactions {
        assert!(Instant::now() < deadline, "never committed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.stats().durable_commits, waited.durable_commits);
    while store.stats().durable_commits == waited.durable_commits {
        assert!(Instant::now() < deadline, "no fsync after the interval");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered = reopen(store, &dir);
    assert!(offsets(&recovered, "q").is_empty());
}

#[tokio::test]
async fn commit_after_close_never_resolves() {
    let dir = TempDir::new("closed");
    let (store, _) = open(&dir);
    store.close();
    store.close(); // idempotent
    let pending = store.commit(vec![put(1, b"late")]);
    let outcome = tokio::time::timeout(Duration::from_millis(100), pending).await;
    assert!(outcome.is_err(), "a commit after close must not resolve");
}

/// Measurement, not a check: writes 1,000,000 persistent 1 KiB messages through windowed
/// single-message commits (as confirm-mode publishers would), recovers them, then acks
/// them all. Run with
/// `cargo test --release store::tests::million -- --ignored --nocapture`.
#[test]
#[ignore]
fn million_messages_write_and_recover() {
    const N: u64 = 1_000_000;
    const WINDOW: usize = 10_000;
    let dir = match std::env::var_os("WARREN_STORE_BENCH_DIR") {
        Some(path) => TempDir(PathBuf::from(path).join("bench")),
        None => TempDir::new("million"),
    };
    let flush = match std::env::var("WARREN_STORE_BENCH_FLUSH").as_deref() {
        Ok("interval") => FlushMode::Interval,
        _ => FlushMode::Sync,
    };
    let body = Bytes::from(vec![0xa5u8; 1024]);

    let (store, _) = Store::open(dir.path(), flush, Duration::from_millis(200)).expect("open");
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut in_flight = 0usize;
    for i in 0..N {
        if in_flight == WINDOW {
            rx.recv().expect("confirm");
            in_flight -= 1;
        }
        let tx = tx.clone();
        store.commit_then(
            vec![
                StoreOp::PutMessage {
                    msg_id: i,
                    blob: body.clone().into(),
                },
                StoreOp::Enqueue {
                    queue: format!("q/%2f/bench-{}", i % 4).into(),
                    offset: i / 4,
                    msg_id: i,
                },
            ],
            Box::new(move || {
                let _ = tx.send(());
            }),
        );
        in_flight += 1;
    }
    for _ in 0..in_flight {
        rx.recv().expect("confirm");
    }
    let write = started.elapsed();
    let stats = store.stats();
    store.close();
    let size = std::fs::metadata(dir.path().join(DB_FILE_NAME))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "write ({flush:?}): {N} x 1 KiB in {write:?} ({:.0} msg/s), {} transactions ({} fsync), file {} MiB",
        N as f64 / write.as_secs_f64(),
        stats.transactions,
        stats.durable_commits,
        size >> 20
    );

    let started = Instant::now();
    let (store, recovered) =
        Store::open(dir.path(), flush, Duration::from_millis(200)).expect("reopen");
    let recover = started.elapsed();
    let total: usize = recovered.queues.values().map(RecoveredQueue::len).sum();
    println!("recover: {total} entries in {recover:?}");
    assert_eq!(total, N as usize);
    assert_eq!(recovered.next_msg_id, N);

    let started = Instant::now();
    for (queue, entries) in &recovered.queues {
        let entries: Vec<RecoveredEntry> = entries.iter().collect();
        for chunk in entries.chunks(100) {
            store.submit(
                chunk
                    .iter()
                    .map(|e| StoreOp::Remove {
                        queue: queue.as_str().into(),
                        offset: e.offset,
                    })
                    .collect(),
            );
        }
    }
    futures_block_on(store.commit(vec![]));
    let ack = started.elapsed();
    println!("ack: {N} removes (submit, 100 per request) in {ack:?}");
    drop(recovered);
    store.close();
    let started = Instant::now();
    let (store, recovered) =
        Store::open(dir.path(), flush, Duration::from_millis(200)).expect("reopen");
    println!("reopen empty: {:?}", started.elapsed());
    assert!(recovered.queues.is_empty());
    store.close();
}

/// Drives one future to completion on a throwaway current-thread runtime.
fn futures_block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
        .block_on(future)
}

#[tokio::test]
async fn work_piling_up_for_the_writer_congests_the_store_until_committed() {
    let dir = TempDir::new("congested");
    let (store, _) = open(&dir);
    assert!(!store.is_congested());
    let resume = store.pause();
    let per_request = 1000;
    let mut offset = 0;
    while offset < super::CONGESTED_OPS {
        let ops = (offset..offset + per_request)
            .map(|o| remove("q", o))
            .collect();
        store.submit(ops);
        offset += per_request;
        if offset < super::CONGESTED_OPS {
            assert!(!store.is_congested(), "congested at {offset} ops");
        }
    }
    assert!(store.is_congested());
    drop(resume);
    store.commit(vec![]).await;
    assert!(!store.is_congested());

    // Bytes count too: a few large messages are as much work as many small ops.
    let resume = store.pause();
    let blob = Bytes::from(vec![0u8; (super::CONGESTED_BYTES / 4) as usize]);
    for id in 0..4 {
        store.submit(vec![StoreOp::PutMessage {
            msg_id: id,
            blob: blob.clone().into(),
        }]);
    }
    assert!(store.is_congested());
    drop(resume);
    store.commit(vec![]).await;
    assert!(!store.is_congested());
    store.close();
}

#[tokio::test]
async fn access_records_come_back_apart_from_definitions() {
    let dir = TempDir::new("access");
    let (store, _) = open(&dir);
    store
        .commit(vec![
            StoreOp::PutAccess {
                key: "u/bob".into(),
                value: b"bob v1".to_vec(),
            },
            StoreOp::PutAccess {
                key: "u/carol".into(),
                value: b"carol".to_vec(),
            },
            StoreOp::PutAccess {
                key: "u/bob".into(),
                value: b"bob v2".to_vec(),
            },
            StoreOp::PutDefinition {
                key: "q/%2f/a".into(),
                value: b"queue a".to_vec(),
            },
        ])
        .await;
    store
        .commit(vec![StoreOp::DeleteAccess {
            key: "u/carol".into(),
        }])
        .await;
    let recovered = reopen(store, &dir);
    assert_eq!(
        recovered.access,
        vec![("u/bob".to_string(), b"bob v2".to_vec())]
    );
    assert_eq!(
        recovered.definitions,
        vec![("q/%2f/a".to_string(), b"queue a".to_vec())]
    );
}

#[tokio::test]
async fn raft_logs_and_values_of_every_group_survive_a_reopen() {
    let dir = TempDir::new("raft-log");
    let (store, recovered) = open(&dir);
    assert!(recovered.raft.is_empty(), "a new store has no Raft group");
    let append = |group, index: u64| StoreOp::RaftAppend {
        group,
        index,
        entry: Bytes::from(format!("g{group}-{index}")),
    };
    let mut ops: Vec<StoreOp> = (1..=6).map(|i| append(0, i)).collect();
    ops.extend((1..=3).map(|i| append(9, i)));
    ops.push(StoreOp::RaftPutState {
        group: 0,
        key: "vote".into(),
        value: Bytes::from_static(b"v1"),
    });
    store.commit(ops).await;
    store
        .commit(vec![
            StoreOp::RaftTruncateFrom { group: 0, index: 5 },
            StoreOp::RaftPurgeUpTo { group: 0, index: 2 },
            append(0, 5),
            StoreOp::RaftPutState {
                group: 0,
                key: "vote".into(),
                value: Bytes::from_static(b"v2"),
            },
        ])
        .await;
    let recovered = reopen(store, &dir);
    let g0 = &recovered.raft[&0];
    let indexes: Vec<u64> = g0.log.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        indexes,
        [3, 4, 5],
        "purged up to 2, truncated from 5, 5 appended again"
    );
    assert_eq!(g0.state["vote"], b"v2");
    assert_eq!(recovered.raft[&9].log.len(), 3, "other groups untouched");
}

/// Entry `index` of Raft group `group`, its bytes naming both.
fn raft_append(group: u64, index: u64) -> StoreOp {
    StoreOp::RaftAppend {
        group,
        index,
        entry: Bytes::from(format!("g{group}-{index}")),
    }
}

#[tokio::test]
async fn raft_entries_are_chunks_of_their_own_log_and_go_with_them() {
    let dir = TempDir::new("raft-chunks");
    let (store, _) = open(&dir);
    // Each commit writes a chunk of the message log and one of the Raft log.
    for i in 1..=4u64 {
        store
            .commit(vec![
                put(i, b"m"),
                enqueue("q", i, i),
                raft_append(1, i),
                raft_append(2, i),
            ])
            .await;
    }
    store
        .commit(vec![
            StoreOp::RaftPurgeUpTo { group: 1, index: 3 },
            StoreOp::RaftDropGroup { group: 2 },
            remove("q", 1),
            remove("q", 2),
        ])
        .await;
    store.close();
    drop(store);
    // Message chunks 1 and 2 hold nothing live any more (messages 1, 2 settled): they
    // went. Raft chunks 1 to 3 neither (entries up to 3 of group 1 purged, group 2
    // dropped). Each log's truncation is its own: entries do not keep messages'
    // chunks, nor messages entries'.
    let numbers: Vec<u64> = stored_chunks(&dir).iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers.first(), Some(&3), "dead heads deleted: {numbers:?}");
    let raft_numbers: Vec<u64> = stored_rows(&dir, super::schema::RAFT_CHUNKS)
        .iter()
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(raft_numbers.first(), Some(&4), "{raft_numbers:?}");
    let (store, recovered) = open(&dir);
    let g1: Vec<(u64, Vec<u8>)> = recovered.raft[&1].log.clone();
    assert_eq!(g1, vec![(4, b"g1-4".to_vec())], "purged up to 3");
    assert!(
        !recovered.raft.contains_key(&2),
        "dropped group comes back empty"
    );
    assert_eq!(offsets(&recovered, "q").len(), 2);
    store
        .commit(vec![
            StoreOp::RaftPurgeUpTo { group: 1, index: 4 },
            remove("q", 3),
            remove("q", 4),
        ])
        .await;
    let recovered = reopen(store, &dir);
    assert!(recovered.raft.is_empty(), "{:?}", recovered.raft.keys());
    assert!(
        stored_chunks(&dir).len() <= 1,
        "the log shrinks to its last chunk"
    );
    assert!(stored_rows(&dir, super::schema::RAFT_CHUNKS).len() <= 1);
}

#[tokio::test]
async fn a_version_3_database_has_its_raft_rows_moved_into_raft_chunks() {
    let dir = TempDir::new("raft-v3");
    let (store, _) = open(&dir);
    store
        .commit(vec![put(1, b"m"), enqueue("q", 0, 1), raft_append(7, 1)])
        .await;
    store.close();
    drop(store);
    stamp_schema_version(&dir, 3, |txn| {
        let mut rows = txn
            .open_table(super::schema::V3_RAFT_LOG)
            .expect("raft_log");
        for index in 2..=3u64 {
            let entry = format!("g7-{index}");
            rows.insert((7, index), entry.as_bytes()).expect("row");
        }
        rows.insert((8, 1), b"g8-1".as_slice()).expect("row");
    });
    let (store, recovered) = open(&dir);
    let indexes = |group: u64| -> Vec<(u64, Vec<u8>)> { recovered.raft[&group].log.clone() };
    assert_eq!(
        indexes(7),
        vec![
            (1, b"g7-1".to_vec()),
            (2, b"g7-2".to_vec()),
            (3, b"g7-3".to_vec())
        ]
    );
    assert_eq!(indexes(8), vec![(1, b"g8-1".to_vec())]);
    assert_eq!(offsets(&recovered, "q"), vec![(0, 1)]);
    // Moved entries are cut like any other.
    store
        .commit(vec![StoreOp::RaftPurgeUpTo { group: 7, index: 2 }])
        .await;
    let recovered = reopen(store, &dir);
    assert_eq!(recovered.raft[&7].log.len(), 1);
    let names = table_names(&dir);
    assert!(!names.iter().any(|n| n == "raft_log"), "{names:?}");
    let db = Database::open(dir.path().join(DB_FILE_NAME)).expect("open db");
    let txn = db.begin_read().expect("read txn");
    let version = txn
        .open_table(META)
        .expect("meta")
        .get(META_SCHEMA_VERSION)
        .expect("get")
        .map(|v| v.value());
    assert_eq!(version, Some(super::schema::SCHEMA_VERSION));
}

#[tokio::test]
async fn a_single_node_never_creates_the_raft_tables() {
    let dir = TempDir::new("no-raft");
    let (store, _) = open(&dir);
    store
        .commit(vec![
            put(1, b"m"),
            StoreOp::Enqueue {
                queue: "q/%2f/a".into(),
                offset: 0,
                msg_id: 1,
            },
            StoreOp::PutDefinition {
                key: "q/%2f/a".into(),
                value: b"{}".to_vec(),
            },
        ])
        .await;
    store.close();
    drop(store);
    let names = table_names(&dir);
    assert!(names.iter().any(|n| n == "message_log"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("raft")),
        "no Raft table without a cluster: {names:?}"
    );
}

#[tokio::test]
async fn a_settlement_behind_a_live_head_chunk_keeps_its_message_settled() {
    let dir = TempDir::new("behind-head");
    let (store, _) = open(&dir);
    store
        .commit(vec![
            put(1, b"a"),
            enqueue("q", 1, 1),
            put(2, b"b"),
            enqueue("q", 2, 2),
        ])
        .await;
    store
        .commit(vec![put(3, b"c"), enqueue("q", 3, 3), remove("q", 1)])
        .await;
    // Chunk 2 is now dead, but chunk 1 before it lives (message 2): chunk 2 must stay,
    // or its settlement of message 1 would be lost.
    store.commit(vec![remove("q", 3)]).await;
    let recovered = reopen(store, &dir);
    assert_eq!(offsets(&recovered, "q"), vec![(2, 2)]);
    assert_eq!(stored_message_ids(&dir), vec![1, 2, 3]);

    let (store, _) = open(&dir);
    store.commit(vec![remove("q", 2)]).await;
    let recovered = reopen(store, &dir);
    assert!(recovered.queues.is_empty());
    assert!(stored_chunks(&dir).is_empty());
}

#[tokio::test]
async fn a_long_lived_message_at_the_head_is_rewritten_so_the_log_follows_the_backlog() {
    let dir = TempDir::new("rewrite-head");
    let (store, _) = open(&dir);
    store
        .commit(vec![put(0, b"pinned"), enqueue("q", 0, 0)])
        .await;
    let delivered = || StoreOp::MarkDelivered {
        queue: "q".into(),
        offset: 0,
    };
    store.commit(vec![delivered(), delivered()]).await;
    // 96 MiB flow past the pinned message, each settled in the next commit.
    let body = Bytes::from(vec![7u8; 1 << 20]);
    let written: u64 = 96;
    for i in 1..=written {
        store
            .commit(vec![
                StoreOp::PutMessage {
                    msg_id: i,
                    blob: body.clone().into(),
                },
                enqueue("q", i, i),
            ])
            .await;
        store.commit(vec![remove("q", i)]).await;
    }
    store.close();
    drop(store);
    let on_disk: usize = stored_chunks(&dir)
        .iter()
        .chain(&stored_bodies(&dir))
        .map(|(_, b)| b.len())
        .sum();
    assert!(
        (on_disk as u64) < (written << 20) * 3 / 4,
        "{on_disk} bytes of log for one live message after {written} MiB"
    );
    assert!(stored_message_ids(&dir).contains(&0));
    let recovered = reopen(open(&dir).0, &dir);
    let q = &entries(&recovered, "q");
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].blob, whole(b"pinned"));
    assert_eq!(
        q[0].delivery_count, 2,
        "the rewrite keeps the delivery count"
    );

    let (store, _) = open(&dir);
    store.commit(vec![remove("q", 0)]).await;
    let recovered = reopen(store, &dir);
    assert!(
        recovered.queues.is_empty(),
        "the rewritten entry is settled"
    );
    assert!(stored_chunks(&dir).is_empty());
}

#[tokio::test]
async fn a_version_1_database_is_converted_to_the_message_log() {
    use super::schema::{DEFINITIONS, META, META_SCHEMA_VERSION, V1_ENTRIES, V1_MESSAGES};
    let dir = TempDir::new("v1");
    std::fs::create_dir_all(dir.path()).expect("mkdir");
    {
        let db = Database::create(dir.path().join(DB_FILE_NAME)).expect("create db");
        let txn = db.begin_write().expect("write txn");
        {
            txn.open_table(META)
                .expect("meta")
                .insert(META_SCHEMA_VERSION, 1u64)
                .expect("version");
            txn.open_table(DEFINITIONS)
                .expect("definitions")
                .insert("q/%2f/a", &b"queue a"[..])
                .expect("definition");
            let mut messages = txn.open_table(V1_MESSAGES).expect("messages");
            for (id, blob) in [(1u64, &b"one"[..]), (2, b"two"), (3, b"orphan")] {
                messages.insert(id, blob).expect("message");
            }
            let mut entries = txn.open_table(V1_ENTRIES).expect("entries");
            entries.insert(("a", 10), (1u64, 0u32)).expect("entry");
            entries.insert(("a", 11), (2u64, 3u32)).expect("entry");
            entries.insert(("b", 5), (1u64, 0u32)).expect("entry");
            // Dangling: its message is missing.
            entries.insert(("b", 6), (99u64, 0u32)).expect("entry");
        }
        txn.commit().expect("commit");
    }
    for _ in 0..2 {
        let (store, recovered) = open(&dir);
        store.close();
        assert_eq!(
            recovered.definitions,
            vec![("q/%2f/a".to_string(), b"queue a".to_vec())]
        );
        assert_eq!(offsets(&recovered, "a"), vec![(10, 1), (11, 2)]);
        assert_eq!(offsets(&recovered, "b"), vec![(5, 1)]);
        let a = &entries(&recovered, "a");
        assert_eq!(a[1].blob, whole(b"two"));
        assert_eq!(a[1].delivery_count, 3);
        assert!(a[1].delivered);
        assert_eq!(entries(&recovered, "b")[0].blob, whole(b"one"));
    }
    let db = Database::open(dir.path().join(DB_FILE_NAME)).expect("open db");
    let txn = db.begin_read().expect("read txn");
    let names: Vec<String> = txn
        .list_tables()
        .expect("list tables")
        .map(|t| t.name().to_string())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n == "messages" || n == "queue_entries"),
        "{names:?}"
    );
    assert_eq!(
        txn.open_table(META)
            .expect("meta")
            .get(META_SCHEMA_VERSION)
            .expect("get")
            .map(|v| v.value()),
        Some(super::schema::SCHEMA_VERSION)
    );
}

/// [`Store::read_messages`] as an async call.
async fn read(store: &Store, ids: Vec<u64>) -> Vec<Option<Bytes>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.read_messages(
        ids,
        Box::new(move |answer| {
            let _ = tx.send(answer);
        }),
    );
    rx.await.expect("answered").expect("read")
}

#[tokio::test]
async fn stored_messages_read_back_in_the_order_asked_and_settled_ones_do_not() {
    let dir = TempDir::new("read-back");
    let (store, _) = open(&dir);
    store.commit(vec![put(1, b"one"), enqueue("q", 1, 1)]).await;
    // Submitted, not awaited: the read comes after it all the same.
    store.submit(vec![put(2, b"two"), enqueue("q", 2, 2)]);
    store.submit(vec![put(3, b"three"), enqueue("q", 3, 3)]);
    let got = read(&store, vec![3, 1, 2, 9]).await;
    let want: Vec<Option<Bytes>> = vec![
        Some(Bytes::from_static(b"three")),
        Some(Bytes::from_static(b"one")),
        Some(Bytes::from_static(b"two")),
        None,
    ];
    assert_eq!(got, want);
    store.submit(vec![remove("q", 2)]);
    assert_eq!(read(&store, vec![2]).await, vec![None], "settled: gone");
    store.close();
}

#[tokio::test]
async fn a_message_moved_by_head_compaction_is_read_from_its_new_chunk() {
    let dir = TempDir::new("read-moved");
    let (store, _) = open(&dir);
    store
        .commit(vec![put(0, b"pinned"), enqueue("q", 0, 0)])
        .await;
    assert_eq!(
        read(&store, vec![0]).await,
        vec![Some(Bytes::from_static(b"pinned"))]
    );
    let body = Bytes::from(vec![7u8; 1 << 20]);
    for i in 1..=96u64 {
        store
            .commit(vec![
                StoreOp::PutMessage {
                    msg_id: i,
                    blob: body.clone().into(),
                },
                enqueue("q", i, i),
            ])
            .await;
        store.commit(vec![remove("q", i)]).await;
    }
    // The first chunk (read and cached above) is gone: the message lives further on.
    assert_eq!(
        read(&store, vec![0]).await,
        vec![Some(Bytes::from_static(b"pinned"))]
    );
    store.close();
    let first = stored_chunks(&dir).first().map(|(n, _)| *n);
    assert_ne!(first, Some(1), "the head chunk was rewritten");
}

#[tokio::test]
async fn a_trimmed_open_reads_back_a_queues_first_messages_whole_and_only_a_digest_after() {
    let dir = TempDir::new("trimmed");
    // The "head" of these blobs is what comes up to ':'; its digest, the head's
    // length and its second byte.
    let trim = BlobTrim {
        whole_per_queue: 30,
        digest: |head| {
            let head_len = colon_head_len(head)?;
            Some(HeadDigest {
                head_len,
                words: [head_len as u64, u64::from(head[1])],
            })
        },
        head_len: colon_head_len,
    };
    let (store, _) = open_trimmed(&dir, trim);
    let mut ops = Vec::new();
    for i in 0..10u64 {
        // Message 6 has no head its digest can make sense of.
        let blob = if i == 6 {
            "headless".to_string()
        } else {
            format!("h{i}:body-of-{i}")
        };
        ops.push(StoreOp::PutMessage {
            msg_id: i,
            blob: Bytes::from(blob).into(),
        });
        ops.push(enqueue("q", i, i));
        ops.push(enqueue("other", i, i));
    }
    store.commit(ops).await;
    store.close();
    drop(store);
    // Heads are kept with the records, bodies apart (but the headless one's).
    let records: Vec<u8> = stored_chunks(&dir)
        .into_iter()
        .flat_map(|(_, b)| b)
        .collect();
    let bodies_in_records = records.windows(8).filter(|w| w == b"body-of-").count();
    assert_eq!(bodies_in_records, 0, "no body among the records");
    let (store, recovered) = open_trimmed(&dir, trim);
    for queue in ["q", "other"] {
        let q = entries(&recovered, queue);
        assert_eq!(q.len(), 10);
        for (i, e) in q.iter().enumerate() {
            assert_eq!((e.offset, e.msg_id), (i as u64, i as u64));
            let whole = format!("h{i}:body-of-{i}");
            if i < 3 || i == 6 {
                let expected = if i == 6 { "headless".into() } else { whole };
                assert_eq!(
                    e.blob,
                    RecoveredBlob::Whole(Bytes::from(expected)),
                    "within the first 30 bytes, or without a digest: whole"
                );
            } else {
                let words = [3, u64::from(b'0') + i as u64];
                let tail_len = whole.len() - 3;
                assert_eq!(
                    e.blob,
                    RecoveredBlob::OnDisk { words, tail_len },
                    "past them: the digest"
                );
            }
        }
    }
    // The bodies are still there to be read.
    assert_eq!(
        read(&store, vec![7]).await,
        vec![Some(Bytes::from_static(b"h7:body-of-7"))]
    );
    // Taking the entries by value gives the same.
    let mut recovered = recovered;
    let by_value: Vec<RecoveredEntry> = recovered
        .queues
        .remove("q")
        .map(|q| q.into_iter().collect())
        .unwrap_or_default();
    assert_eq!(by_value, entries(&recovered, "other"));
    store.close();
}

#[tokio::test]
async fn a_message_in_a_chunk_numbered_as_a_dropped_one_is_read_back() {
    let dir = TempDir::new("read-reused");
    let (store, _) = open(&dir);
    // Each message lives alone in the last chunk and goes before the next is written:
    // the last chunk is dropped and its number used again, while the reader caches it.
    for i in 1..=50u64 {
        let body = Bytes::from(format!("body {i}"));
        store
            .commit(vec![
                StoreOp::PutMessage {
                    msg_id: i,
                    blob: body.clone().into(),
                },
                enqueue("q", i, i),
            ])
            .await;
        assert_eq!(read(&store, vec![i]).await, vec![Some(body)], "message {i}");
        store.commit(vec![remove("q", i)]).await;
    }
    store.close();
}

#[tokio::test]
async fn a_version_2_log_with_blobs_inside_its_chunks_is_still_read_and_compacted() {
    let dir = TempDir::new("format-1");
    std::fs::create_dir_all(dir.path()).expect("dir");
    // Version 2 wrote one format-1 chunk per commit, each blob inside its `Put`.
    let le32 = |v: u32| v.to_le_bytes().to_vec();
    let le64 = |v: u64| v.to_le_bytes().to_vec();
    let mut chunk = vec![1u8, 1];
    chunk.extend(le32(0));
    chunk.extend(le32(1));
    chunk.extend(b"q");
    for i in 0..10u64 {
        let blob = format!("h{i}:body-of-{i}");
        chunk.push(2);
        chunk.extend(le64(i));
        chunk.extend(le32(blob.len() as u32));
        chunk.extend(blob.as_bytes());
        chunk.push(3);
        chunk.extend(le32(0));
        chunk.extend(le64(i));
        chunk.extend(le64(i));
        chunk.extend(le32(u32::from(i == 4)));
    }
    {
        let db = Database::create(dir.path().join(DB_FILE_NAME)).expect("create db");
        let txn = db.begin_write().expect("write txn");
        txn.open_table(META)
            .expect("meta")
            .insert(META_SCHEMA_VERSION, 2)
            .expect("version");
        txn.open_table(MESSAGE_LOG)
            .expect("message log")
            .insert(1, chunk.as_slice())
            .expect("chunk");
        txn.commit().expect("commit");
    }
    let trim = BlobTrim {
        whole_per_queue: 30,
        digest: |head| {
            let head_len = colon_head_len(head)?;
            Some(HeadDigest {
                head_len,
                words: [head_len as u64, 0],
            })
        },
        head_len: colon_head_len,
    };
    let (store, recovered) = open_trimmed(&dir, trim);
    let q = entries(&recovered, "q");
    assert_eq!(q.len(), 10);
    for (i, e) in q.iter().enumerate() {
        let whole = format!("h{i}:body-of-{i}");
        assert_eq!(e.delivery_count, u32::from(i == 4));
        if i < 3 {
            assert_eq!(e.blob, RecoveredBlob::Whole(Bytes::from(whole)));
        } else {
            let (words, tail_len) = ([3, 0], whole.len() - 3);
            assert_eq!(e.blob, RecoveredBlob::OnDisk { words, tail_len });
        }
    }
    assert_eq!(
        read(&store, vec![7, 2]).await,
        vec![
            Some(Bytes::from_static(b"h7:body-of-7")),
            Some(Bytes::from_static(b"h2:body-of-2"))
        ]
    );
    // Settling some writes a new chunk beside the old one.
    store.commit(vec![remove("q", 0), remove("q", 5)]).await;
    store.close();
    drop(store);
    let db = Database::open(dir.path().join(DB_FILE_NAME)).expect("open db");
    let version = db
        .begin_read()
        .expect("read txn")
        .open_table(META)
        .expect("meta")
        .get(META_SCHEMA_VERSION)
        .expect("get")
        .map(|v| v.value());
    assert_eq!(version, Some(super::schema::SCHEMA_VERSION));
    drop(db);
    let (store, recovered) = open_trimmed(&dir, trim);
    let ids: Vec<u64> = entries(&recovered, "q").iter().map(|e| e.msg_id).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 6, 7, 8, 9]);
    store.close();
    drop(store);
    // Compaction moves the old chunk's live messages into a new chunk, cut into head
    // and body.
    let chunks: Vec<(u64, Bytes)> = stored_chunks(&dir)
        .into_iter()
        .map(|(n, b)| (n, Bytes::from(b)))
        .collect();
    assert_eq!(
        chunks[0].1,
        Bytes::from(chunk.clone()),
        "the old chunk is kept"
    );
    let mut index = log::replay(chunks).expect("replay").index;
    let next = index.next_chunk();
    index.begin(next);
    let mut out = ChunkWriter::new(Some(trim.head_len));
    index.rewrite(1, &chunk, &[], &mut out).expect("rewrite");
    let mut reader = ChunkReader::new(next, out.bytes()).expect("new format");
    let mut moved = Vec::new();
    while let Some(record) = reader.next_record().expect("record") {
        if let Record::Put { msg_id, head, body } = record {
            let blob = log::copy_blob(next, out.bytes(), out.bodies(), head, body).expect("blob");
            assert_eq!(head.len, 3);
            assert_eq!(blob, Bytes::from(format!("h{msg_id}:body-of-{msg_id}")));
            moved.push(msg_id);
        }
    }
    assert_eq!(moved, vec![1, 2, 3, 4, 6, 7, 8, 9]);
}

#[tokio::test]
async fn a_message_handed_over_as_head_and_body_is_stored_and_read_back_whole() {
    let dir = TempDir::new("parts");
    let trim = BlobTrim {
        whole_per_queue: 1 << 20,
        digest: |_| None,
        head_len: colon_head_len,
    };
    let (store, _) = open_trimmed(&dir, trim);
    store
        .commit(vec![
            StoreOp::PutMessage {
                msg_id: 0,
                blob: MessageBlob::Parts {
                    head: Bytes::from_static(b"h0:"),
                    body: Bytes::from_static(b"body-of-0"),
                },
            },
            enqueue("q", 0, 0),
            StoreOp::PutMessage {
                msg_id: 1,
                blob: Bytes::from_static(b"h1:body-of-1").into(),
            },
            enqueue("q", 1, 1),
        ])
        .await;
    assert_eq!(
        read(&store, vec![0, 1]).await,
        vec![
            Some(Bytes::from_static(b"h0:body-of-0")),
            Some(Bytes::from_static(b"h1:body-of-1"))
        ]
    );
    store.close();
    drop(store);
    // Both bodies went to the bodies row, neither to the records.
    let records: Vec<u8> = stored_chunks(&dir)
        .into_iter()
        .flat_map(|(_, b)| b)
        .collect();
    assert_eq!(records.windows(8).filter(|w| w == b"body-of-").count(), 0);
    let (store, recovered) = open_trimmed(&dir, trim);
    let q = entries(&recovered, "q");
    assert_eq!(
        q[0].blob,
        RecoveredBlob::Whole(Bytes::from_static(b"h0:body-of-0"))
    );
    assert_eq!(
        q[1].blob,
        RecoveredBlob::Whole(Bytes::from_static(b"h1:body-of-1"))
    );
    store.close();
}
