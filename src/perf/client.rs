//! The producer and consumer loops: one task per connection on a single-threaded
//! runtime, working on whole read and write batches. Per message they copy (publish) or
//! parse in place (deliver) a few frames and touch a few counters: no allocation, no
//! future, no system call.

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::io::Interest;

use super::check::{SeqSet, SeqTracker};
use super::hist::Histogram;
use super::wire::{
    Conn, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, PublishTemplate, READ_CHUNK,
    method_id, parse_ack, parse_body_size, parse_deliver, whole_frame, write_ack,
};

/// Sequences and timestamps are 48-bit fields of the stamp.
const MASK48: u64 = (1 << 48) - 1;
/// Bytes of the stamp at the start of every body.
pub const STAMP_LEN: usize = 16;
/// A loop with nothing to do looks at the stop flags this often.
const IDLE_TICK: Duration = Duration::from_millis(50);
/// A loop that always has work yields to the others after this many batches (each
/// yield costs the runtime an epoll_wait).
const YIELD_EVERY: u32 = 8;
/// Held acks are written out after this long without a delivery.
const ACK_LINGER: Duration = Duration::from_millis(10);
/// Publishes are written in batches of about this many bytes.
const BATCH_BYTES: usize = 128 * 1024;

/// Writes the stamp: (producer id, sequence) and the send time, tagged with the run.
#[inline]
pub fn stamp(body: &mut [u8], run_tag: u16, producer: u16, seq: u64, sent_ns: u64) {
    let w0 = (seq & MASK48) | (u64::from(producer) << 48);
    let w1 = (sent_ns & MASK48) | (u64::from(run_tag) << 48);
    body[..8].copy_from_slice(&w0.to_le_bytes());
    body[8..16].copy_from_slice(&w1.to_le_bytes());
}

/// Reads a stamp: (run tag, producer id, sequence, send time).
#[inline]
pub fn read_stamp(b: &[u8; STAMP_LEN]) -> (u16, u16, u64, u64) {
    let w0 = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let w1 = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    (
        (w1 >> 48) as u16,
        (w0 >> 48) as u16,
        w0 & MASK48,
        w1 & MASK48,
    )
}

/// State shared by all loops of a run (one thread: plain cells).
pub struct Shared {
    /// Time zero of the stamps.
    pub epoch: Instant,
    /// Tells this run's messages from leftovers of earlier runs.
    pub run_tag: u16,
    /// Number of producers (trackers are indexed queue * producers + producer).
    pub producers: usize,
    /// Messages published, per producer.
    pub published: Vec<Cell<u64>>,
    /// Publishes confirmed (basic.ack) by the broker.
    pub confirmed: Cell<u64>,
    /// Publishes refused (basic.nack) by the broker.
    pub nacked: Cell<u64>,
    /// Deliveries, all consumers.
    pub delivered: Cell<u64>,
    /// Deliveries whose body carried no stamp of this run.
    pub foreign: Cell<u64>,
    /// When the last publish was written.
    pub last_publish: Cell<Option<Instant>>,
    /// When the last confirm arrived.
    pub last_confirm: Cell<Option<Instant>>,
    /// When the last delivery arrived.
    pub last_delivery: Cell<Option<Instant>>,
    /// Producers stop publishing (and wait for their confirms).
    pub stop_publishing: Cell<bool>,
    /// Consumers ack what they hold and stop.
    pub stop_consuming: Cell<bool>,
    /// End-to-end latency of every delivery (ns).
    pub latency: RefCell<Histogram>,
    /// Latency since the last progress line (ns).
    pub interval_latency: RefCell<Histogram>,
    /// What each queue received from each producer.
    pub trackers: Vec<RefCell<SeqTracker>>,
}

impl Shared {
    /// Fresh state for `producers` producers and `queues` queues.
    pub fn new(producers: usize, queues: usize, run_tag: u16) -> Shared {
        Shared {
            epoch: Instant::now(),
            run_tag,
            producers,
            published: (0..producers).map(|_| Cell::new(0)).collect(),
            confirmed: Cell::new(0),
            nacked: Cell::new(0),
            delivered: Cell::new(0),
            foreign: Cell::new(0),
            last_publish: Cell::new(None),
            last_confirm: Cell::new(None),
            last_delivery: Cell::new(None),
            stop_publishing: Cell::new(false),
            stop_consuming: Cell::new(false),
            latency: RefCell::new(Histogram::default()),
            interval_latency: RefCell::new(Histogram::default()),
            trackers: (0..producers * queues)
                .map(|_| RefCell::new(SeqTracker::default()))
                .collect(),
        }
    }

    /// Total messages published.
    pub fn total_published(&self) -> u64 {
        self.published.iter().map(Cell::get).sum()
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// Reads what the socket has now; false when nothing was there.
///
/// A read that leaves buffer space unfilled drained the socket: readiness is cleared
/// then (through `try_io`), so the next read attempt costs no system call until the
/// runtime sees new data. Edge-triggered epoll reports every arrival, so nothing is
/// missed.
fn read_now(conn: &mut Conn) -> io::Result<bool> {
    if conn.rbuf.capacity() - conn.rbuf.len() < READ_CHUNK / 4 {
        conn.rbuf.reserve(READ_CHUNK);
    }
    let room = conn.rbuf.capacity() - conn.rbuf.len();
    let mut got = 0;
    let stream = &conn.stream;
    let rbuf = &mut conn.rbuf;
    let r = stream.try_io(Interest::READABLE, || {
        got = stream.try_read_buf(rbuf)?;
        if got > 0 && got < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    });
    match r {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the broker closed the socket",
        )),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(got > 0),
        Err(e) => Err(e),
    }
}

/// Writes what the socket takes now; a short write clears write readiness, as in
/// [`read_now`].
fn write_now(conn: &mut Conn) -> io::Result<()> {
    while !conn.wbuf.is_empty() {
        let stream = &conn.stream;
        let wbuf = &mut conn.wbuf;
        let r = stream.try_io(Interest::WRITABLE, || {
            let n = stream.try_write(wbuf)?;
            let short = n < wbuf.len();
            bytes::Buf::advance(wbuf, n);
            if short {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.write_blocked = !conn.wbuf.is_empty();
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    conn.write_blocked = false;
    conn.wbuf.clear();
    Ok(())
}

/// Waits until the socket is readable (or writable, when a write was cut short), or
/// `max_wait` passes.
async fn wait(conn: &Conn, max_wait: Duration) -> io::Result<()> {
    let interest = if conn.write_blocked {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    tokio::select! {
        r = conn.stream.ready(interest) => r.map(|_| ()),
        _ = tokio::time::sleep(max_wait) => Ok(()),
    }
}

/// What one producer does.
pub struct ProducerSpec {
    /// Producer id stamped into bodies.
    pub id: u16,
    /// The frames of one message.
    pub template: PublishTemplate,
    /// Most publishes awaiting a confirm (0: no confirms).
    pub confirm_window: u64,
    /// Messages per second (0: as fast as possible).
    pub rate: f64,
    /// Messages to publish (0: until told to stop).
    pub count: u64,
    /// How long to wait for the last confirms once publishing stopped.
    pub confirm_timeout: Duration,
}

/// What a producer did.
pub struct ProducerResult {
    /// Messages published (sequences `0..published`).
    pub published: u64,
    /// Sequences the broker confirmed.
    pub confirmed: SeqSet,
    /// Sequences the broker refused.
    pub nacked: SeqSet,
}

struct Confirms {
    confirmed: SeqSet,
    nacked: SeqSet,
    /// Every sequence below this is settled.
    floor: u64,
}

impl Confirms {
    fn settled(&self) -> u64 {
        self.confirmed.len() + self.nacked.len()
    }

    fn settle(&mut self, tag: u64, multiple: bool, ack: bool) {
        let Some(seq) = tag.checked_sub(1) else {
            return;
        };
        if !multiple {
            if !self.confirmed.contains(seq) && !self.nacked.contains(seq) {
                if ack {
                    self.confirmed.insert(seq);
                } else {
                    self.nacked.insert(seq);
                }
            }
            return;
        }
        if ack && self.nacked.is_empty() {
            self.confirmed.insert_through(seq);
        } else {
            for s in self.floor..=seq {
                if !self.confirmed.contains(s) && !self.nacked.contains(s) {
                    if ack {
                        self.confirmed.insert(s);
                    } else {
                        self.nacked.insert(s);
                    }
                }
            }
        }
        self.floor = self.floor.max(seq + 1);
    }
}

/// Publishes until the count, the stop flag or an error, then waits for the confirms.
pub async fn produce(
    mut conn: Conn,
    spec: ProducerSpec,
    shared: Rc<Shared>,
) -> Result<ProducerResult> {
    let msg_len = spec.template.bytes.len();
    let stamp_at = spec.template.body_at;
    let per_batch = (BATCH_BYTES / msg_len).max(1) as u64;
    let mut c = Confirms {
        confirmed: SeqSet::new(),
        nacked: SeqSet::new(),
        floor: 0,
    };
    let mut seq: u64 = 0;
    let started = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    let mut batches = 0u32;
    let my_published = &shared.published[spec.id as usize];
    loop {
        // Confirms and anything else the broker said.
        if read_now(&mut conn)? {
            let before = c.settled();
            let confirmed_before = c.confirmed.len();
            while let Some(h) = whole_frame(&conn.rbuf) {
                if h.kind == FRAME_METHOD {
                    let payload = &conn.rbuf[7..7 + h.size];
                    let id = method_id(payload);
                    if id == (60, 80) || id == (60, 120) {
                        if let Some((tag, multiple)) = parse_ack(payload) {
                            c.settle(tag, multiple, id.1 == 80);
                        }
                        conn.skip_frame(h);
                        continue;
                    }
                    conn.slow_frame().await?;
                } else if h.kind == FRAME_HEARTBEAT {
                    conn.skip_frame(h);
                } else {
                    conn.slow_frame().await?;
                }
            }
            if c.settled() != before {
                let acked = c.confirmed.len() - confirmed_before;
                add(&shared.confirmed, acked);
                add(&shared.nacked, c.settled() - before - acked);
                shared.last_confirm.set(Some(Instant::now()));
            }
        }
        let outstanding = seq - c.settled();
        let stop = shared.stop_publishing.get() || (spec.count > 0 && seq >= spec.count);
        if stop {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            write_now(&mut conn)?;
            let waiting = spec.confirm_window > 0 && outstanding > 0;
            if conn.wbuf.is_empty() && (!waiting || since.elapsed() > spec.confirm_timeout) {
                break;
            }
            wait(&conn, IDLE_TICK).await?;
            continue;
        }
        let mut n = per_batch;
        if spec.confirm_window > 0 {
            n = n.min(spec.confirm_window.saturating_sub(outstanding));
        }
        if spec.count > 0 {
            n = n.min(spec.count - seq);
        }
        let mut next_slot = None;
        if spec.rate > 0.0 {
            let elapsed = started.elapsed().as_secs_f64();
            let allowed = (spec.rate * elapsed) as u64 + 1;
            n = n.min(allowed.saturating_sub(seq));
            if n == 0 {
                let at = (seq + 1) as f64 / spec.rate - elapsed;
                next_slot = Some(Duration::from_secs_f64(at.clamp(0.0001, 0.05)));
            }
        }
        if n > 0 && conn.wbuf.is_empty() {
            let sent_ns = shared.now_ns();
            conn.wbuf.reserve(msg_len * n as usize);
            for _ in 0..n {
                let at = conn.wbuf.len() + stamp_at;
                conn.wbuf.extend_from_slice(&spec.template.bytes);
                stamp(
                    &mut conn.wbuf[at..at + STAMP_LEN],
                    shared.run_tag,
                    spec.id,
                    seq,
                    sent_ns,
                );
                seq += 1;
            }
            add(my_published, n);
            shared.last_publish.set(Some(Instant::now()));
        }
        write_now(&mut conn)?;
        if !conn.wbuf.is_empty() || n == 0 {
            wait(&conn, next_slot.unwrap_or(IDLE_TICK)).await?;
            batches = 0;
        } else {
            batches += 1;
            if batches >= YIELD_EVERY {
                tokio::task::yield_now().await;
                batches = 0;
            }
        }
    }
    conn.close(spec.confirm_timeout).await;
    Ok(ProducerResult {
        published: seq,
        confirmed: c.confirmed,
        nacked: c.nacked,
    })
}

/// What one consumer does.
pub struct ConsumerSpec {
    /// Index of the queue it consumes from.
    pub queue: usize,
    /// The broker acks on delivery (no_ack).
    pub auto_ack: bool,
    /// Ack every this many deliveries with `multiple` (1: each on its own).
    pub ack_every: u64,
    /// Ack frames are written out once they cover this many deliveries, or when no
    /// delivery came for a moment: one write per batch of acks, not one per read.
    pub flush_every: u64,
}

/// A delivery being assembled from its frames.
struct Incoming {
    tag: u64,
    redelivered: bool,
    remaining: u64,
    stamp: [u8; STAMP_LEN],
    stamp_len: usize,
}

/// Consumes (the consumer is already registered on channel 1) until told to stop.
pub async fn consume(mut conn: Conn, spec: ConsumerSpec, shared: Rc<Shared>) -> Result<()> {
    let mut cur = Incoming {
        tag: 0,
        redelivered: false,
        remaining: 0,
        stamp: [0; STAMP_LEN],
        stamp_len: 0,
    };
    let mut in_content = false;
    // Deliveries not acked yet, and deliveries whose ack frames wait in the write buffer.
    let mut pending_acks: u64 = 0;
    let mut held: u64 = 0;
    let mut last_tag: u64 = 0;
    let tracker_base = spec.queue * shared.producers;
    let mut got = read_now(&mut conn)?;
    let mut batches = 0u32;
    loop {
        if shared.stop_consuming.get() {
            break;
        }
        if !conn.rbuf.is_empty() {
            let now = Instant::now();
            let now_ns = now.duration_since(shared.epoch).as_nanos() as u64;
            let mut delivered = 0u64;
            while let Some(h) = whole_frame(&conn.rbuf) {
                let mut complete = false;
                match h.kind {
                    FRAME_METHOD => {
                        let payload = &conn.rbuf[7..7 + h.size];
                        if method_id(payload) != (60, 60) {
                            conn.slow_frame().await?;
                            continue;
                        }
                        let Some((tag, redelivered)) = parse_deliver(payload) else {
                            bail!("malformed basic.deliver");
                        };
                        cur.tag = tag;
                        cur.redelivered = redelivered;
                        cur.stamp_len = 0;
                        in_content = true;
                    }
                    FRAME_HEADER if in_content => {
                        let payload = &conn.rbuf[7..7 + h.size];
                        cur.remaining = parse_body_size(payload).unwrap_or(0);
                        complete = cur.remaining == 0;
                    }
                    FRAME_BODY if in_content => {
                        let payload = &conn.rbuf[7..7 + h.size];
                        let take = (STAMP_LEN - cur.stamp_len).min(payload.len());
                        cur.stamp[cur.stamp_len..cur.stamp_len + take]
                            .copy_from_slice(&payload[..take]);
                        cur.stamp_len += take;
                        cur.remaining = cur.remaining.saturating_sub(h.size as u64);
                        complete = cur.remaining == 0;
                    }
                    _ => {}
                }
                conn.skip_frame(h);
                if !complete {
                    continue;
                }
                in_content = false;
                delivered += 1;
                let (run, producer, seq, sent_ns) = read_stamp(&cur.stamp);
                if cur.stamp_len == STAMP_LEN
                    && run == shared.run_tag
                    && (producer as usize) < shared.producers
                {
                    shared.trackers[tracker_base + producer as usize]
                        .borrow_mut()
                        .record(seq, cur.redelivered);
                    let lat = now_ns.wrapping_sub(sent_ns) & MASK48;
                    shared.latency.borrow_mut().record(lat);
                    shared.interval_latency.borrow_mut().record(lat);
                } else {
                    add(&shared.foreign, 1);
                }
                if !spec.auto_ack {
                    pending_acks += 1;
                    last_tag = cur.tag;
                    if pending_acks >= spec.ack_every {
                        write_ack(&mut conn.wbuf, 1, last_tag, spec.ack_every > 1);
                        held += pending_acks;
                        pending_acks = 0;
                    }
                }
            }
            if delivered > 0 {
                add(&shared.delivered, delivered);
                shared.last_delivery.set(Some(now));
            }
        }
        if held >= spec.flush_every {
            write_now(&mut conn)?;
        }
        if conn.wbuf.is_empty() {
            held = 0;
        }
        if got {
            batches += 1;
            if batches >= YIELD_EVERY {
                tokio::task::yield_now().await;
                batches = 0;
            }
            got = read_now(&mut conn)?;
            continue;
        }
        batches = 0;
        // The socket is drained: sleep until data comes, or only briefly when acks wait.
        let linger = held > 0 || pending_acks > 0;
        wait(&conn, if linger { ACK_LINGER } else { IDLE_TICK }).await?;
        got = read_now(&mut conn)?;
        if !got && linger {
            if pending_acks > 0 {
                write_ack(&mut conn.wbuf, 1, last_tag, true);
                pending_acks = 0;
            }
            write_now(&mut conn)?;
            if conn.wbuf.is_empty() {
                held = 0;
            }
        }
    }
    if pending_acks > 0 {
        write_ack(&mut conn.wbuf, 1, last_tag, true);
    }
    conn.flush().await?;
    conn.close(Duration::from_secs(5)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let mut b = [0u8; STAMP_LEN];
        stamp(&mut b, 0xBEEF, 7, 123_456_789, 987_654_321_000);
        assert_eq!(read_stamp(&b), (0xBEEF, 7, 123_456_789, 987_654_321_000));
    }
}
