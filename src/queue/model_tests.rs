//! Property tests of the queue state machine: random command sequences, checked against a
//! plain model of where every message is (ready, unacked, gone), and replayed on two
//! state machines that must agree step by step (the property replication rests on).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::args::{Overflow, QueueArgs};
use super::message::Message;
use super::state::{ConsumerId, ConsumerSpec, Credit, DeathReason, Effect, Enqueued, QueueState};

/// One input to the queue.
#[derive(Debug, Clone)]
enum Command {
    Enqueue(usize),
    AddConsumer { prefetch: u32, no_ack: bool },
    RemoveConsumer(usize),
    Deliver,
    Ack(usize),
    Requeue(usize),
    Reject(usize),
    Get { no_ack: bool },
    Purge,
    Advance(u64),
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => (1usize..64).prop_map(Command::Enqueue),
        1 => (0u32..4, any::<bool>()).prop_map(|(prefetch, no_ack)| Command::AddConsumer { prefetch, no_ack }),
        1 => (0usize..4).prop_map(Command::RemoveConsumer),
        3 => Just(Command::Deliver),
        2 => (0usize..8).prop_map(Command::Ack),
        2 => (0usize..8).prop_map(Command::Requeue),
        1 => (0usize..8).prop_map(Command::Reject),
        1 => any::<bool>().prop_map(|no_ack| Command::Get { no_ack }),
        1 => Just(Command::Purge),
        1 => (0u64..40).prop_map(Command::Advance),
    ]
}

fn args() -> impl Strategy<Value = QueueArgs> {
    (
        proptest::option::of(1u64..50),
        proptest::option::of(1u64..6),
        proptest::option::of(0u64..3),
        any::<bool>(),
    )
        .prop_map(|(message_ttl, max_length, delivery_limit, sac)| QueueArgs {
            message_ttl,
            max_length,
            overflow: Overflow::DropHead,
            delivery_limit,
            single_active_consumer: sac,
            ..QueueArgs::default()
        })
}

/// Every consumer may always take more, as far as the channel is concerned.
struct Unlimited;

impl Credit for Unlimited {
    fn has_credit(&mut self, _consumer: ConsumerId) -> bool {
        true
    }
}

/// Where the model believes each message is.
#[derive(Default)]
struct Model {
    ready: BTreeSet<u64>,
    /// offset -> (consumer, times it came back)
    unacked: BTreeMap<u64, Option<ConsumerId>>,
    returns: HashMap<u64, u64>,
    gone: BTreeSet<u64>,
    consumers: BTreeMap<ConsumerId, (u32, bool)>,
    held: HashMap<ConsumerId, u32>,
}

impl Model {
    fn head(&self) -> Option<u64> {
        self.ready.first().copied()
    }

    fn leave_ready(&mut self, offset: u64) {
        assert_eq!(self.head(), Some(offset), "messages leave from the head");
        self.ready.remove(&offset);
    }

    fn finish(&mut self, offset: u64) {
        assert!(self.gone.insert(offset), "message {offset} finished twice");
    }

    /// Checks one effect against the model and moves the message.
    fn effect(&mut self, e: &Effect, args: &QueueArgs, now: u64) {
        match e {
            Effect::Deliver { consumer, entry } => {
                let (prefetch, no_ack) = *self.consumers.get(consumer).expect("a live consumer");
                self.leave_ready(entry.offset);
                if no_ack {
                    self.finish(entry.offset);
                } else {
                    let held = self.held.entry(*consumer).or_default();
                    *held += 1;
                    assert!(prefetch == 0 || *held <= prefetch, "prefetch respected");
                    self.unacked.insert(entry.offset, Some(*consumer));
                }
                if args.single_active_consumer {
                    assert_eq!(
                        self.consumers.keys().next(),
                        Some(consumer),
                        "only the active consumer"
                    );
                }
            }
            Effect::DeadLetter { entry, reason } => {
                match reason {
                    DeathReason::Expired => {
                        assert!(
                            entry.expires_at.is_some_and(|t| t < now),
                            "expired only when due"
                        );
                        self.leave_ready(entry.offset);
                    }
                    DeathReason::MaxLen => self.leave_ready(entry.offset),
                    DeathReason::Rejected => {
                        assert!(
                            self.unacked.remove(&entry.offset).is_some(),
                            "rejected was unacked"
                        );
                    }
                    DeathReason::DeliveryLimit => {
                        assert!(
                            self.unacked.remove(&entry.offset).is_some(),
                            "limit hit on requeue"
                        );
                        let limit = args.delivery_limit.expect("a delivery limit");
                        assert!(entry.delivery_count as u64 > limit);
                    }
                }
                self.finish(entry.offset);
            }
        }
    }

    fn release(&mut self, consumer: Option<ConsumerId>) {
        if let Some(c) = consumer
            && let Some(h) = self.held.get_mut(&c)
        {
            *h = h.saturating_sub(1);
        }
    }
}

/// A short summary of effects, to compare two replicas.
fn summary(effects: &[Effect]) -> Vec<(u8, u64, u64)> {
    effects
        .iter()
        .map(|e| match e {
            Effect::Deliver { consumer, entry } => (0, *consumer, entry.offset),
            Effect::DeadLetter { entry, reason } => (1 + *reason as u8, 0, entry.offset),
        })
        .collect()
}

fn message(size: usize, now: u64) -> Arc<Message> {
    Arc::new(Message::for_tests(Bytes::from(vec![0u8; size]), now))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// No message is lost or duplicated, FIFO order holds, prefetch and single active
    /// consumer are respected, and two replicas fed the same commands agree.
    #[test]
    fn queue_state_matches_the_model(args in args(), commands in proptest::collection::vec(command(), 1..120)) {
        let mut a = QueueState::new(args.clone());
        let mut b = QueueState::new(args.clone());
        let mut m = Model::default();
        let mut now = 1_000u64;
        let mut next_consumer: ConsumerId = 1;
        let mut enqueued = 0u64;
        for cmd in commands {
            let (mut ea, mut eb) = (Vec::new(), Vec::new());
            match cmd {
                Command::Enqueue(size) => {
                    let msg = message(size, now);
                    let ra = a.enqueue(msg.clone(), &mut ea);
                    let rb = b.enqueue(msg, &mut eb);
                    prop_assert_eq!(ra, rb);
                    prop_assert_eq!(ra, Enqueued::Accepted(enqueued));
                    m.ready.insert(enqueued);
                    enqueued += 1;
                }
                Command::AddConsumer { prefetch, no_ack } => {
                    let spec = ConsumerSpec { id: next_consumer, priority: 0, prefetch, no_ack };
                    a.add_consumer(spec.clone());
                    b.add_consumer(spec);
                    m.consumers.insert(next_consumer, (prefetch, no_ack));
                    next_consumer += 1;
                }
                Command::RemoveConsumer(i) => {
                    if let Some(&id) = m.consumers.keys().nth(i) {
                        prop_assert!(a.remove_consumer(id));
                        prop_assert!(b.remove_consumer(id));
                        m.consumers.remove(&id);
                        // Its unacked messages stay unacked (they belong to its channel).
                    }
                }
                Command::Deliver => {
                    a.deliver(now, &mut Unlimited, &mut ea);
                    b.deliver(now, &mut Unlimited, &mut eb);
                }
                Command::Ack(i) | Command::Requeue(i) | Command::Reject(i) => {
                    let Some((&offset, &consumer)) = m.unacked.iter().nth(i) else { continue };
                    match cmd {
                        Command::Ack(_) => {
                            let ra = a.settle(&[offset]);
                            let rb = b.settle(&[offset]);
                            prop_assert_eq!(ra.len(), 1);
                            prop_assert_eq!(rb.len(), 1);
                            m.unacked.remove(&offset);
                            m.release(consumer);
                            m.finish(offset);
                        }
                        Command::Requeue(_) => {
                            a.requeue(&[offset], &mut ea);
                            b.requeue(&[offset], &mut eb);
                            m.release(consumer);
                            let n = m.returns.entry(offset).or_default();
                            *n += 1;
                            if args.delivery_limit.is_none_or(|l| *n <= l) {
                                m.unacked.remove(&offset);
                                m.ready.insert(offset);
                            }
                        }
                        _ => {
                            a.reject(&[offset], &mut ea);
                            b.reject(&[offset], &mut eb);
                            m.release(consumer);
                        }
                    }
                }
                Command::Get { no_ack } => {
                    let ga = a.get(now, no_ack, &mut ea);
                    let gb = b.get(now, no_ack, &mut eb);
                    prop_assert_eq!(ga.as_ref().map(|e| e.offset), gb.as_ref().map(|e| e.offset));
                    for e in &ea {
                        m.effect(e, &args, now);
                    }
                    ea.clear();
                    eb.clear();
                    if let Some(e) = ga {
                        m.leave_ready(e.offset);
                        if no_ack {
                            m.finish(e.offset);
                        } else {
                            m.unacked.insert(e.offset, None);
                        }
                    }
                }
                Command::Purge => {
                    let pa: Vec<u64> = a.purge().iter().map(|e| e.offset).collect();
                    let pb: Vec<u64> = b.purge().iter().map(|e| e.offset).collect();
                    prop_assert_eq!(&pa, &pb);
                    let expected: Vec<u64> = m.ready.iter().copied().collect();
                    prop_assert_eq!(&pa, &expected);
                    for o in pa {
                        m.ready.remove(&o);
                        m.finish(o);
                    }
                }
                Command::Advance(ms) => {
                    now += ms;
                    a.expire(now, &mut ea);
                    b.expire(now, &mut eb);
                }
            }
            prop_assert_eq!(summary(&ea), summary(&eb));
            for e in &ea {
                m.effect(e, &args, now);
            }
            prop_assert_eq!(a.ready_count(), m.ready.len());
            prop_assert_eq!(b.ready_count(), m.ready.len());
            prop_assert_eq!(a.unacked_count(), m.unacked.len());
            if let Some(max) = args.max_length {
                prop_assert!(a.ready_count() as u64 <= max);
            }
            // Every message is in exactly one place.
            prop_assert_eq!(
                (m.ready.len() + m.unacked.len() + m.gone.len()) as u64,
                enqueued
            );
        }
        // Whatever is ready comes out, head first, until nothing is left.
        loop {
            let mut effects = Vec::new();
            let got = a.get(now, true, &mut effects);
            for e in &effects {
                m.effect(e, &args, now);
            }
            match got {
                Some(e) => m.leave_ready(e.offset),
                None => break,
            }
        }
        prop_assert!(m.ready.is_empty());
    }
}
