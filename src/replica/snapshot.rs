//! A replicated queue's snapshot as it travels to a follower: a stream of records in an
//! unlinked temporary file of the node's data directory, so that neither the leader that
//! writes it nor the follower that installs it holds the queue's backlog in memory (a
//! backlog may be far larger than memory; its bodies live in the store).
//!
//! openraft sends a snapshot in chunks read from its data at increasing offsets, and
//! the follower writes them into data of its own ([`SnapshotFile`] is both). The leader
//! fills its file in the background, reading bodies back from its store in batches,
//! while openraft already holds it: reads and seeks wait until the file is complete, so
//! the state machine goes on applying meanwhile.
//!
//! The stream: [`MAGIC`], then records ([`SnapshotRecord`], each a little-endian `u32`
//! length and its postcard encoding), the last an [`SnapshotRecord::End`] that counts
//! the others, so that a truncated stream is refused rather than installed.

use std::io::{self, SeekFrom, Write};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::queue::DeathReason;

/// First bytes of a snapshot stream. A snapshot without them was sent by a node that
/// encoded the whole content at once (read as such).
pub const MAGIC: [u8; 8] = *b"WRNSNAP1";

/// Largest record a stream may hold: a replicated message travelled in one cluster
/// frame, so its record is smaller than one.
const MAX_RECORD_BYTES: usize = crate::cluster::wire::MAX_FRAME_BYTES;

/// One record of a snapshot stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SnapshotRecord {
    /// A committed message: its key, how often it was handed out, its store encoding.
    Message {
        key: u64,
        delivered: u32,
        blob: Bytes,
    },
    /// A message dead-lettered and not yet taken by its targets.
    DeadLetter {
        key: u64,
        reason: DeathReason,
        blob: Bytes,
    },
    /// The stream's end: how many records of each kind came before it.
    End { messages: u64, dead_letters: u64 },
}

/// Appends `record` to a stream being written.
pub fn write_record(out: &mut impl Write, record: &SnapshotRecord) -> io::Result<()> {
    let bytes = postcard::to_stdvec(record).map_err(io::Error::other)?;
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&l| l as usize <= MAX_RECORD_BYTES)
        .ok_or_else(|| io::Error::other("snapshot record too large"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&bytes)
}

/// A snapshot's bytes: an unlinked file (see the module's doc), maybe still being
/// filled.
pub struct SnapshotFile {
    /// `None` for a snapshot that is only a log id (see `build_snapshot`): it reads as
    /// empty and takes no file.
    file: Option<tokio::fs::File>,
    /// Set while the leader's background task still writes the file; its answer is
    /// the write's outcome.
    filling: Option<oneshot::Receiver<io::Result<()>>>,
    /// A seek asked for while the file was being filled (done once it is).
    pending_seek: Option<SeekFrom>,
}

/// Files made so far by this process (names are unique within a data directory).
static FILES_MADE: AtomicU64 = AtomicU64::new(0);

/// A new empty file in `dir`, unlinked at once: it goes with its last handle, even
/// when the process dies.
fn unlinked_file(dir: &Path) -> io::Result<std::fs::File> {
    loop {
        let n = FILES_MADE.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".snapshot-{}-{n}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            // (Left by a process of the same id that died between the two calls.)
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

impl SnapshotFile {
    /// Data that reads as empty, without a file (a snapshot openraft only keeps the
    /// description of).
    pub fn empty() -> SnapshotFile {
        SnapshotFile {
            file: None,
            filling: None,
            pending_seek: None,
        }
    }

    /// An empty file in `dir`, for a snapshot being received.
    pub fn create(dir: &Path) -> io::Result<SnapshotFile> {
        Ok(SnapshotFile {
            file: Some(tokio::fs::File::from_std(unlinked_file(dir)?)),
            filling: None,
            pending_seek: None,
        })
    }

    /// A file in `dir` that `fill` writes (on a blocking thread) after this returns:
    /// reading it waits until `fill` is done, and fails if `fill` did. `fill` is given
    /// a check of whether the file is still wanted: once it is dropped (openraft gave up
    /// on that follower), a long fill should stop.
    pub fn filled_by(
        dir: &Path,
        fill: impl FnOnce(&mut io::BufWriter<std::fs::File>, &dyn Fn() -> bool) -> io::Result<()>
        + Send
        + 'static,
    ) -> io::Result<SnapshotFile> {
        let file = unlinked_file(dir)?;
        let writer = file.try_clone()?;
        let (tx, rx) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let mut out = io::BufWriter::with_capacity(1 << 20, writer);
            let wanted = || !tx.is_closed();
            let written = out
                .write_all(&MAGIC)
                .and_then(|()| fill(&mut out, &wanted))
                .and_then(|()| out.flush());
            let _ = tx.send(written);
        });
        Ok(SnapshotFile {
            file: Some(tokio::fs::File::from_std(file)),
            filling: Some(rx),
            pending_seek: None,
        })
    }

    /// Waits until the file is complete.
    fn poll_filled(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(filling) = &mut self.filling else {
            return Poll::Ready(Ok(()));
        };
        let outcome = ready!(Pin::new(filling).poll(cx))
            .unwrap_or_else(|_| Err(io::Error::other("snapshot writer stopped")));
        self.filling = None;
        Poll::Ready(outcome)
    }

    /// The stream from its start, for installing it: its records, or the whole content
    /// of a snapshot sent without [`MAGIC`] (by an earlier version).
    pub async fn open(mut self) -> io::Result<Opened> {
        std::future::poll_fn(|cx| self.poll_filled(cx)).await?;
        let Some(mut file) = self.file else {
            return Ok(Opened::Whole(Vec::new()));
        };
        file.rewind().await?;
        let mut reader = tokio::io::BufReader::with_capacity(1 << 20, file);
        let mut start = Vec::with_capacity(MAGIC.len());
        (&mut reader)
            .take(MAGIC.len() as u64)
            .read_to_end(&mut start)
            .await?;
        if start == MAGIC {
            return Ok(Opened::Records(Records {
                reader,
                messages: 0,
                dead_letters: 0,
            }));
        }
        reader.read_to_end(&mut start).await?;
        Ok(Opened::Whole(start))
    }
}

/// A received snapshot, opened.
pub enum Opened {
    /// A stream of records.
    Records(Records),
    /// A content encoded at once (as nodes wrote it before streams).
    Whole(Vec<u8>),
}

/// Reads a stream's records in order.
pub struct Records {
    reader: tokio::io::BufReader<tokio::fs::File>,
    messages: u64,
    dead_letters: u64,
}

impl Records {
    /// The next record; `None` after the [`SnapshotRecord::End`] (checked against the
    /// records read). A stream that ends early or holds a malformed record is an error.
    pub async fn next(&mut self) -> io::Result<Option<SnapshotRecord>> {
        let len = self.reader.read_u32_le().await? as usize;
        if len > MAX_RECORD_BYTES {
            return Err(io::Error::other(format!("snapshot record of {len} bytes")));
        }
        let mut bytes = vec![0; len];
        self.reader.read_exact(&mut bytes).await?;
        let record: SnapshotRecord = postcard::from_bytes(&bytes).map_err(io::Error::other)?;
        match &record {
            SnapshotRecord::Message { .. } => self.messages += 1,
            SnapshotRecord::DeadLetter { .. } => self.dead_letters += 1,
            SnapshotRecord::End {
                messages,
                dead_letters,
            } => {
                if (*messages, *dead_letters) != (self.messages, self.dead_letters) {
                    return Err(io::Error::other(format!(
                        "snapshot ends after {} messages and {} dead letters, announced \
                         {messages} and {dead_letters}",
                        self.messages, self.dead_letters
                    )));
                }
                return Ok(None);
            }
        }
        Ok(Some(record))
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_filled(cx))?;
        match &mut this.file {
            Some(file) => Pin::new(file).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_filled(cx))?;
        match &mut this.file {
            Some(file) => Pin::new(file).poll_write(cx, buf),
            None => Poll::Ready(Err(io::Error::other("an empty snapshot is not written to"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_filled(cx))?;
        match &mut this.file {
            Some(file) => Pin::new(file).poll_flush(cx),
            None => Poll::Ready(Err(io::Error::other("an empty snapshot is not written to"))),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_filled(cx))?;
        match &mut this.file {
            Some(file) => Pin::new(file).poll_shutdown(cx),
            None => Poll::Ready(Err(io::Error::other("an empty snapshot is not written to"))),
        }
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        match &mut this.file {
            Some(_) if this.filling.is_some() => {
                this.pending_seek = Some(position);
                Ok(())
            }
            Some(file) => Pin::new(file).start_seek(position),
            None => Ok(()),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        ready!(this.poll_filled(cx))?;
        let Some(file) = &mut this.file else {
            return Poll::Ready(Ok(0));
        };
        if let Some(position) = this.pending_seek.take() {
            Pin::new(&mut *file).start_seek(position)?;
        }
        Pin::new(file).poll_complete(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn message(key: u64) -> SnapshotRecord {
        SnapshotRecord::Message {
            key,
            delivered: 1,
            blob: Bytes::from(vec![key as u8; 3000]),
        }
    }

    async fn read_all(file: SnapshotFile) -> io::Result<Vec<SnapshotRecord>> {
        let Opened::Records(mut records) = file.open().await? else {
            panic!("a stream");
        };
        let mut all = Vec::new();
        while let Some(r) = records.next().await? {
            all.push(r);
        }
        Ok(all)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_reads_back_a_short_one_is_refused_and_a_dropped_one_stops_its_writer() {
        let dir = std::env::temp_dir().join(format!("warren-snapfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let written: Vec<SnapshotRecord> = (0..100).map(message).collect();
        let records = written.clone();
        let mut file = SnapshotFile::filled_by(&dir, move |out, _| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            for r in &records {
                write_record(out, r)?;
            }
            write_record(
                out,
                &SnapshotRecord::End {
                    messages: 100,
                    dead_letters: 0,
                },
            )
        })
        .unwrap();
        // Unlinked: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        // As openraft asks: the length first (waits for the writer), then chunks.
        let end = file.seek(SeekFrom::End(0)).await.unwrap();
        assert!(end > 300_000, "{end}");
        file.seek(SeekFrom::Start(8)).await.unwrap();
        let mut chunk = vec![0; 4];
        file.read_exact(&mut chunk).await.unwrap();
        let len = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        assert!(
            (3000..3100).contains(&len),
            "the first record's length: {len}"
        );
        assert_eq!(read_all(file).await.unwrap(), written);

        // Received in chunks as a follower does, but short of its end: refused.
        let mut received = SnapshotFile::create(&dir).unwrap();
        let mut bytes = MAGIC.to_vec();
        for r in &written[..10] {
            write_record(&mut bytes, r).unwrap();
        }
        write_record(
            &mut bytes,
            &SnapshotRecord::End {
                messages: 11,
                dead_letters: 0,
            },
        )
        .unwrap();
        for (i, chunk) in bytes.chunks(1000).enumerate() {
            received
                .seek(SeekFrom::Start(i as u64 * 1000))
                .await
                .unwrap();
            received.write_all(chunk).await.unwrap();
        }
        received.shutdown().await.unwrap();
        assert!(read_all(received).await.is_err());

        // A file dropped before it is complete stops its writer.
        let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
        let dropped = SnapshotFile::filled_by(&dir, move |out, wanted| {
            let mut written = 0;
            while wanted() && written < 10_000 {
                write_record(out, &message(written))?;
                written += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = stopped_tx.send(written);
            Ok(())
        })
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(dropped);
        let written = tokio::task::spawn_blocking(move || stopped_rx.recv().unwrap())
            .await
            .unwrap();
        assert!(written < 10_000, "the writer went on to {written} records");

        // A writer that fails makes the reads fail.
        let mut failed =
            SnapshotFile::filled_by(&dir, |_, _| Err(io::Error::other("store closed"))).unwrap();
        assert!(failed.seek(SeekFrom::End(0)).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
