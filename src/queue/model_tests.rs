//! Property tests of the queue state machine, driven only through `QueueState::apply`:
//! random command sequences are checked against a plain model of where every message is
//! (ready, unacked, gone) and against the state's own invariants, and replayed on a
//! second state machine that receives every command (and its meta) after a serde round
//! trip through postcard, as a replica would read it from a log: both must give equal
//! replies, equal effects and equal states after every step.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use proptest::prelude::*;

use super::args::{Overflow, QueueArgs};
use super::message::Message;
use super::state::{
    Command, CommandMeta, ConsumerId, ConsumerSpec, DeathReason, Effect, Effects, Enqueued, Entry,
    QueueState, Reply,
};

/// One step of a test run, turned into a `Command` against the current state.
#[derive(Debug, Clone)]
enum Step {
    Enqueue {
        size: usize,
        priority: u8,
        ttl: Option<u64>,
        persistent: bool,
    },
    AddConsumer {
        prefetch: u32,
        no_ack: bool,
        priority: i32,
    },
    RemoveConsumer(usize),
    /// Credit for the consumers whose bit is set.
    Credit(u8),
    Ack(usize, bool),
    Requeue(usize, bool),
    Reject(usize),
    ReturnUndelivered(usize),
    Get {
        no_ack: bool,
    },
    Purge,
    Advance(u64),
    Delete,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (1usize..64, 0u8..4, proptest::option::of(0u64..60), any::<bool>())
            .prop_map(|(size, priority, ttl, persistent)| Step::Enqueue { size, priority, ttl, persistent }),
        1 => (0u32..4, any::<bool>(), 0i32..2)
            .prop_map(|(prefetch, no_ack, priority)| Step::AddConsumer { prefetch, no_ack, priority }),
        1 => (0usize..4).prop_map(Step::RemoveConsumer),
        4 => any::<u8>().prop_map(Step::Credit),
        2 => (0usize..8, any::<bool>()).prop_map(|(i, all)| Step::Ack(i, all)),
        2 => (0usize..8, any::<bool>()).prop_map(|(i, all)| Step::Requeue(i, all)),
        1 => (0usize..8).prop_map(Step::Reject),
        1 => (0usize..8).prop_map(Step::ReturnUndelivered),
        1 => any::<bool>().prop_map(|no_ack| Step::Get { no_ack }),
        1 => Just(Step::Purge),
        2 => (0u64..40).prop_map(Step::Advance),
        // Rarely a delete (else one more credit round).
        1 => (0u8..40).prop_map(|n| if n == 0 { Step::Delete } else { Step::Credit(n) }),
    ]
}

fn args() -> impl Strategy<Value = QueueArgs> {
    (
        proptest::option::of(1u64..50),
        proptest::option::of(1u64..6),
        proptest::option::of(0u64..3),
        any::<bool>(),
        proptest::option::of(1u8..3),
        prop_oneof![
            3 => Just(Overflow::DropHead),
            1 => Just(Overflow::RejectPublish),
            1 => Just(Overflow::RejectPublishDlx),
        ],
    )
        .prop_map(
            |(message_ttl, max_length, delivery_limit, sac, max_priority, overflow)| QueueArgs {
                message_ttl,
                max_length,
                overflow,
                delivery_limit,
                single_active_consumer: sac,
                max_priority,
                ..QueueArgs::default()
            },
        )
}

fn message(size: usize, now: u64, priority: u8, ttl: Option<u64>, id: Option<u64>) -> Message {
    let mut properties = BasicProperties::default().with_priority(priority);
    if let Some(ttl) = ttl {
        properties = properties.with_expiration(ttl.to_string().into());
    }
    if id.is_some() {
        properties = properties.with_delivery_mode(2);
    }
    let raw_properties = crate::protocol::encode::properties(&properties);
    Message {
        exchange: String::new(),
        routing_key: "q".into(),
        properties,
        raw_properties,
        body: Bytes::from(vec![7u8; size]),
        store_id: id,
        published_ms: now,
    }
}

/// The command as a replica reads it from a log: serialised, then deserialised.
fn through_log<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let bytes = postcard::to_allocvec(value).expect("commands serialise");
    postcard::from_bytes(&bytes).expect("commands deserialise")
}

/// The state machine under test (the leader), and optionally a follower that applies
/// what came through the log: then every step compares replies, effects and states.
/// The leader's invariants are checked after every step.
struct Pair {
    leader: QueueState,
    follower: Option<QueueState>,
    index: u64,
}

impl Pair {
    fn new(args: &QueueArgs, replicated: bool) -> Pair {
        Pair {
            leader: QueueState::new(args.clone()),
            follower: replicated.then(|| QueueState::new(args.clone())),
            index: 0,
        }
    }

    fn apply(&mut self, now: u64, cmd: Command) -> Result<(Reply, Effects), TestCaseError> {
        self.index += 1;
        let meta = CommandMeta {
            index: self.index,
            time_ms: now,
        };
        let logged = self.follower.is_some().then(|| through_log(&cmd));
        if let Some(logged) = &logged {
            prop_assert_eq!(logged, &cmd, "a command survives the log unchanged");
        }
        let (reply, effects) = self.leader.apply(&meta, cmd);
        if let (Some(follower), Some(logged)) = (&mut self.follower, logged) {
            let (f_reply, f_effects) = follower.apply(&through_log(&meta), logged);
            prop_assert_eq!(&reply, &f_reply, "replies agree");
            prop_assert_eq!(&through_log(&reply), &reply, "replies survive serde");
            prop_assert_eq!(&effects, &f_effects, "effects agree");
            prop_assert!(&self.leader == follower, "states agree");
        }
        if let Err(broken) = self.leader.check_invariants() {
            return Err(TestCaseError::fail(broken));
        }
        prop_assert_eq!(self.leader.last_index(), self.index);
        Ok((reply, effects))
    }
}

/// Where the model believes each message is.
#[derive(Default)]
struct Model {
    ready: BTreeSet<u64>,
    /// offset -> consumer (None: basic.get)
    unacked: BTreeMap<u64, Option<ConsumerId>>,
    returns: HashMap<u64, u64>,
    gone: BTreeSet<u64>,
    /// id -> (prefetch, no_ack)
    consumers: BTreeMap<ConsumerId, (u32, bool)>,
    held: HashMap<ConsumerId, u32>,
    /// Entries handed out and not yet settled (candidates for ReturnUndelivered).
    handed: BTreeMap<u64, Entry>,
    /// A delivery came back undelivered, or was requeued into a reject-publish queue:
    /// as RabbitMQ (and Warren before), that may leave the queue over its x-max-length.
    overfilled: bool,
}

impl Model {
    fn head_ok(&self, offset: u64, args: &QueueArgs) -> Result<(), TestCaseError> {
        // Without priorities messages leave from the head, in offset order.
        if args.max_priority.is_none() {
            prop_assert_eq!(self.ready.first().copied(), Some(offset), "FIFO");
        }
        Ok(())
    }

    fn leave_ready(&mut self, offset: u64, args: &QueueArgs) -> Result<(), TestCaseError> {
        self.head_ok(offset, args)?;
        prop_assert!(self.ready.remove(&offset), "{} was ready", offset);
        Ok(())
    }

    fn finish(&mut self, offset: u64) -> Result<(), TestCaseError> {
        self.handed.remove(&offset);
        prop_assert!(
            self.gone.insert(offset),
            "message {} finished twice",
            offset
        );
        Ok(())
    }

    fn release(&mut self, consumer: Option<ConsumerId>) {
        if let Some(c) = consumer
            && let Some(h) = self.held.get_mut(&c)
        {
            *h = h.saturating_sub(1);
        }
    }

    /// Checks one effect against the model and moves the message.
    fn effect(&mut self, e: &Effect, args: &QueueArgs, now: u64) -> Result<(), TestCaseError> {
        match e {
            Effect::Deliver { consumer, entry } => {
                let &(prefetch, no_ack) = self.consumers.get(consumer).expect("a live consumer");
                self.leave_ready(entry.offset, args)?;
                self.handed.insert(entry.offset, entry.clone());
                if no_ack {
                    self.gone.insert(entry.offset);
                } else {
                    let held = self.held.entry(*consumer).or_default();
                    *held += 1;
                    prop_assert!(prefetch == 0 || *held <= prefetch, "prefetch respected");
                    self.unacked.insert(entry.offset, Some(*consumer));
                }
                if args.single_active_consumer {
                    prop_assert_eq!(
                        self.consumers.keys().next(),
                        Some(consumer),
                        "only the active consumer"
                    );
                }
            }
            Effect::DeadLetter { entry, reason } => {
                match reason {
                    DeathReason::Expired => {
                        prop_assert!(
                            entry.expires_at().is_some_and(|t| t < now),
                            "expired only when due"
                        );
                        prop_assert!(self.ready.remove(&entry.offset));
                    }
                    DeathReason::MaxLen => {
                        // Dropped from the head, or refused at the door (reject-publish-dlx).
                        if !self.ready.remove(&entry.offset) {
                            prop_assert_eq!(args.overflow, Overflow::RejectPublishDlx);
                            return Ok(());
                        }
                    }
                    DeathReason::Rejected => {
                        prop_assert!(
                            self.unacked.remove(&entry.offset).is_some(),
                            "rejected was unacked"
                        );
                    }
                    DeathReason::DeliveryLimit => {
                        prop_assert!(
                            self.unacked.remove(&entry.offset).is_some(),
                            "limit hit on requeue"
                        );
                        let limit = args.delivery_limit.expect("a delivery limit");
                        prop_assert!(entry.delivery_count as u64 > limit);
                    }
                }
                self.finish(entry.offset)?;
            }
            Effect::Forget { entry } => {
                // Acked (unacked), purged (ready) or enqueued into a deleted queue.
                let was_ready = self.ready.remove(&entry.offset);
                let was_unacked = self.unacked.remove(&entry.offset).is_some();
                prop_assert!(!(was_ready && was_unacked));
                if was_ready || was_unacked {
                    self.finish(entry.offset)?;
                }
            }
            Effect::ForgetAll => {
                for offset in std::mem::take(&mut self.ready) {
                    self.finish(offset)?;
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random command sequences, each command applied on the leader as given and on the
    /// follower after a postcard round trip: replies, effects and states agree after
    /// every step, and the state's invariants hold (`Pair::apply`).
    #[test]
    fn replicas_fed_the_same_log_agree(args in args(), steps in proptest::collection::vec(step(), 1..150)) {
        run_steps(&args, &steps, true)?;
    }

    /// The state's invariants hold after every command (ready and unacked counts, no
    /// message both ready and unacked, offsets unique and ordered), and it matches a
    /// model of where every message is: none is lost or duplicated, FIFO holds, prefetch
    /// and single active consumer are respected.
    #[test]
    fn invariants_and_model_hold(args in args(), steps in proptest::collection::vec(step(), 1..150)) {
        run_steps(&args, &steps, false)?;
    }
}

fn run_steps(args: &QueueArgs, steps: &[Step], replicated: bool) -> Result<(), TestCaseError> {
    let mut q = Pair::new(args, replicated);
    let mut m = Model::default();
    let mut now = 1_000u64;
    let mut next_consumer: ConsumerId = 1;
    let mut next_store_id = 1u64;
    // A restart first: a recovered message, delivered before, at a later offset.
    let restored = 3u64;
    let cmd = Command::Restore {
        offset: restored,
        msg: Arc::new(message(5, now, 0, None, Some(next_store_id))),
        delivered: true,
        delivery_count: 0,
    };
    next_store_id += 1;
    q.apply(now, cmd)?;
    m.ready.insert(restored);
    let mut next_offset = restored + 1;
    let mut enqueued = 1u64;
    for step in steps {
        let (reply, effects) = match step.clone() {
            Step::Enqueue {
                size,
                priority,
                ttl,
                persistent,
            } => {
                let id = persistent.then(|| {
                    next_store_id += 1;
                    next_store_id
                });
                let msg = Arc::new(message(size, now, priority, ttl, id));
                let deleted = q.leader.is_deleted();
                let (reply, effects) = q.apply(now, Command::Enqueue(msg))?;
                if !deleted {
                    if reply == Reply::Enqueued(Enqueued::Accepted(next_offset)) {
                        m.ready.insert(next_offset);
                        enqueued += 1;
                        next_offset += 1;
                    } else {
                        prop_assert_eq!(&reply, &Reply::Enqueued(Enqueued::Rejected));
                        prop_assert!(args.overflow != Overflow::DropHead);
                        // reject-publish-dlx gives the refused message a place to die at.
                        if args.overflow == Overflow::RejectPublishDlx {
                            next_offset += 1;
                        }
                    }
                }
                (reply, effects)
            }
            Step::AddConsumer {
                prefetch,
                no_ack,
                priority,
            } => {
                if q.leader.is_deleted() {
                    continue;
                }
                let spec = ConsumerSpec {
                    id: next_consumer,
                    priority,
                    prefetch,
                    no_ack,
                };
                m.consumers.insert(next_consumer, (prefetch, no_ack));
                next_consumer += 1;
                q.apply(now, Command::AddConsumer(spec))?
            }
            Step::RemoveConsumer(i) => {
                let Some(&id) = m.consumers.keys().nth(i) else {
                    continue;
                };
                m.consumers.remove(&id);
                let (reply, effects) = q.apply(now, Command::RemoveConsumer(id))?;
                prop_assert_eq!(&reply, &Reply::Removed(true));
                (reply, effects)
            }
            Step::Credit(mask) => {
                let granted: Vec<ConsumerId> = m
                    .consumers
                    .keys()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << (i % 8)) != 0)
                    .map(|(_, id)| *id)
                    .collect();
                let asked = granted.len();
                let (reply, effects) = q.apply(now, Command::Credit { granted })?;
                let Reply::Credited { delivered, unused } = &reply else {
                    return Err(TestCaseError::fail("credit answered otherwise"));
                };
                let deliveries = effects
                    .iter()
                    .filter(|e| matches!(e, Effect::Deliver { .. }))
                    .count();
                prop_assert_eq!(*delivered, deliveries);
                prop_assert_eq!(delivered + unused.len(), asked, "each grant used once");
                (reply, effects)
            }
            Step::Ack(i, all) | Step::Requeue(i, all) => {
                let picked: Vec<(u64, Option<ConsumerId>)> = if all {
                    m.unacked
                        .iter()
                        .take(i + 1)
                        .map(|(o, c)| (*o, *c))
                        .collect()
                } else {
                    m.unacked
                        .iter()
                        .nth(i)
                        .map(|(o, c)| (*o, *c))
                        .into_iter()
                        .collect()
                };
                if picked.is_empty() {
                    continue;
                }
                let offsets: Vec<u64> = picked.iter().map(|p| p.0).collect();
                for (_, consumer) in &picked {
                    m.release(*consumer);
                }
                if matches!(step, Step::Ack(..)) {
                    let (reply, effects) = q.apply(now, Command::Settle(offsets.clone()))?;
                    prop_assert_eq!(&reply, &Reply::Settled(offsets.len()));
                    (reply, effects)
                } else {
                    m.overfilled |= args.overflow != Overflow::DropHead;
                    // A deleted queue takes nothing back (the effects tell the model).
                    let offsets_back = if q.leader.is_deleted() {
                        &[][..]
                    } else {
                        &offsets[..]
                    };
                    for offset in offsets_back {
                        let n = m.returns.entry(*offset).or_default();
                        *n += 1;
                        if args.delivery_limit.is_none_or(|l| *n <= l) {
                            m.unacked.remove(offset);
                            m.handed.remove(offset);
                            m.ready.insert(*offset);
                        }
                    }
                    q.apply(now, Command::Requeue(offsets))?
                }
            }
            Step::Reject(i) => {
                let Some((&offset, &consumer)) = m.unacked.iter().nth(i) else {
                    continue;
                };
                m.release(consumer);
                q.apply(now, Command::Reject(vec![offset]))?
            }
            Step::ReturnUndelivered(i) => {
                let Some((&offset, entry)) = m.handed.iter().nth(i) else {
                    continue;
                };
                let entry = entry.clone();
                m.handed.remove(&offset);
                m.overfilled = true;
                if let Some(consumer) = m.unacked.remove(&offset) {
                    m.release(consumer);
                } else {
                    // An auto-ack delivery that never reached its client.
                    m.gone.remove(&offset);
                }
                if !q.leader.is_deleted() {
                    m.ready.insert(offset);
                } else {
                    m.gone.insert(offset);
                }
                q.apply(now, Command::ReturnUndelivered(entry))?
            }
            Step::Get { no_ack } => {
                let (reply, effects) = q.apply(now, Command::Get { no_ack })?;
                for e in &effects {
                    m.effect(e, args, now)?;
                }
                let Reply::Got(got) = &reply else {
                    return Err(TestCaseError::fail("get answered otherwise"));
                };
                if let Some((e, left)) = got {
                    m.leave_ready(e.offset, args)?;
                    prop_assert_eq!(*left as usize, m.ready.len());
                    if no_ack {
                        m.finish(e.offset)?;
                    } else {
                        m.unacked.insert(e.offset, None);
                    }
                }
                check_counts(&q, &m, args, enqueued)?;
                continue;
            }
            Step::Purge => {
                let expected = m.ready.len();
                let (reply, effects) = q.apply(now, Command::Purge)?;
                prop_assert_eq!(&reply, &Reply::Purged(expected));
                (reply, effects)
            }
            Step::Advance(ms) => {
                now += ms;
                q.apply(now, Command::Expire)?
            }
            Step::Delete => {
                m.consumers.clear();
                q.apply(now, Command::Delete)?
            }
        };
        let _ = reply;
        for e in &effects {
            m.effect(e, args, now)?;
        }
        check_counts(&q, &m, args, enqueued)?;
    }
    // Whatever is ready comes out until nothing is left.
    loop {
        let (reply, effects) = q.apply(now, Command::Get { no_ack: true })?;
        for e in &effects {
            m.effect(e, args, now)?;
        }
        match reply {
            Reply::Got(Some((e, _))) => {
                m.leave_ready(e.offset, args)?;
                m.finish(e.offset)?;
            }
            _ => break,
        }
    }
    prop_assert!(m.ready.is_empty());
    Ok(())
}

fn check_counts(q: &Pair, m: &Model, args: &QueueArgs, enqueued: u64) -> Result<(), TestCaseError> {
    prop_assert_eq!(q.leader.ready_count(), m.ready.len());
    prop_assert_eq!(q.leader.unacked_count(), m.unacked.len());
    if let Some(max) = args.max_length
        && !m.overfilled
    {
        prop_assert!(q.leader.ready_count() as u64 <= max);
    }
    // Every message is in exactly one place.
    prop_assert_eq!(
        (m.ready.len() + m.unacked.len() + m.gone.len()) as u64,
        enqueued
    );
    Ok(())
}
