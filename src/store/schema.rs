//! The redb tables of `warren.redb`, in one place so that the writer and recovery cannot
//! disagree about a type or a name.
//!
//! Layout (all keys sort the way recovery wants to read them back):
//!
//! | table           | key                 | value                      |
//! |-----------------|---------------------|----------------------------|
//! | `meta`          | `&str`              | `u64` (schema version)     |
//! | `definitions`   | `&str` (broker key) | `&[u8]` (broker blob)      |
//! | `access`        | `&str` (auth key)   | `&[u8]` (auth blob)        |
//! | `message_log`   | `u64` chunk number  | `&[u8]` (records, see log) |
//! | `message_bodies`| `u64` chunk number  | `&[u8]` (the chunk's bodies)|
//! | `raft_chunks`   | `u64` chunk number  | `&[u8]` (records, see log) |
//! | `raft_state`    | `(u64, &str)`       | `&[u8]` (vote, snapshot..) |
//!
//! Persistent messages and queue entries live in `message_log`: one row (a chunk) per group
//! commit holding that commit's records, truncated at its head as messages are settled
//! (the layout and its invariants are described in `log.rs`). Reference counts and where
//! each live record is are not stored: recovery recomputes them from the chunks.
//!
//! A chunk's `Put` records carry the heads of their blobs, and its row of
//! `message_bodies` the bodies, so that start-up reads the records of every message
//! without its body. Version 2 kept whole blobs in the records (chunk format 1): such
//! chunks are still read, and go as the log is truncated.
//!
//! Version 1 kept one `messages` row per message and one `queue_entries` row per entry;
//! opening such a database converts it (see `recovery::migrate_v1`).
//!
//! Raft groups (cluster mode only) keep their logs in the same layout, in a log of
//! their own, `raft_chunks`: an entry is a record of the chunk of the group commit that
//! appended it, and the log's truncations (a conflicting suffix, a prefix a snapshot
//! covers, the whole group) are records as well, so one format and one truncation rule
//! serve a classic queue's messages and every group's log, and one fsync makes the
//! appends of every group durable. The two logs are apart because their records die
//! differently (a message when it is settled, an entry when a snapshot covers it): in
//! one log, each kept the other's chunks alive. Their small durable values (vote,
//! committed index, snapshot) are `raft_state` rows. A single node creates neither
//! table.
//!
//! Version 3 kept a `raft_log` row per Raft entry, keyed by (group id, log index);
//! opening such a database moves them into `raft_chunks` (see
//! `recovery::migrate_raft_rows`).

use redb::TableDefinition;

/// Version of this layout, stored under [`META_SCHEMA_VERSION`]; bump it (and migrate) on any
/// incompatible change.
pub(crate) const SCHEMA_VERSION: u64 = 4;

/// Key of the schema version in [`META`].
pub(crate) const META_SCHEMA_VERSION: &str = "schema_version";

/// Small bookkeeping values (the schema version).
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Durable exchanges, queues and bindings, opaque to the store.
pub(crate) const DEFINITIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("definitions");

/// Users, vhosts and permissions (the access-control definitions), opaque to the store.
/// Kept apart from [`DEFINITIONS`] so that the metadata they describe can move (to a
/// replicated metadata group) without touching the exchanges' and queues' records.
pub(crate) const ACCESS: TableDefinition<&str, &[u8]> = TableDefinition::new("access");

/// The message log: chunk number -> the records of one group commit.
pub(crate) const MESSAGE_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("message_log");

/// The bodies of each message log chunk's messages, under the chunk's number (absent
/// when it has none).
pub(crate) const MESSAGE_BODIES: TableDefinition<u64, &[u8]> =
    TableDefinition::new("message_bodies");

/// Version 1: every persistent message blob, by msg id (read only to migrate).
pub(crate) const V1_MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");

/// Version 1: (queue key, offset) -> (msg id, delivery count) (read only to migrate).
pub(crate) const V1_ENTRIES: TableDefinition<(&str, u64), (u64, u32)> =
    TableDefinition::new("queue_entries");

/// Every Raft group's log: chunk number -> the Raft records of one group commit.
pub(crate) const RAFT_CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_chunks");

/// Version 3: every Raft group's log, (group id, index) -> encoded entry (read only to
/// migrate).
pub(crate) const V3_RAFT_LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("raft_log");

/// Every Raft group's durable values: (group id, name) -> encoded value.
pub(crate) const RAFT_STATE: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("raft_state");
