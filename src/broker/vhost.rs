//! A virtual host: its exchanges and queues, and the AMQP rules for declaring, binding,
//! deleting and routing, with RabbitMQ's reply codes and texts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};

use amq_protocol::types::{AMQPValue, FieldTable};

use super::cluster_defs::ClusterLink;
use super::exchange::{
    Binding, Destination, Exchange, ExchangeDef, ExchangeKind, validate_binding_args,
};
use super::mirroring::Mirroring;
use super::persist::{self, StoredBinding, StoredDefinition, StoredExchange, StoredQueue};
use crate::protocol::{AmqpError, reply::amqp_err};
use crate::queue::journal::{Journal, Writes};
use crate::queue::{DeadLetterRouter, Message, Queue, QueueArgs, QueueDef, QueueStore, Spool};
use crate::replica::{DEFAULT_GROUP_SIZE, Replication};
use crate::store::{Store, StoreOp};

/// Queue arguments whose values must match on redeclare (as RabbitMQ checks them).
const EQUIVALENT_QUEUE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
    "x-delivery-limit",
];

/// One vhost.
#[derive(Debug)]
pub struct VHost {
    /// Name.
    pub name: String,
    exchanges: RwLock<HashMap<String, Arc<Exchange>>>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    store: Option<Store>,
    /// The node's body window and memory pressure, for the queues it creates.
    paging: crate::queue::Paging,
    msg_ids: Arc<AtomicU64>,
    me: Weak<VHost>,
    /// Set on a clustered node: durable definitions go to the metadata group.
    cluster: Arc<OnceLock<ClusterLink>>,
    /// Durable queues homed on another node, by name: their home.
    homes: RwLock<HashMap<String, String>>,
    /// The vhost's policies (the one in force for a queue changes its settings).
    policies: RwLock<Vec<crate::auth::PolicyRecord>>,
}

fn lock_read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn lock_write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn bool_text(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// A short rendering of an argument value for error texts.
fn value_text(v: Option<&AMQPValue>) -> String {
    match v {
        None => "none".into(),
        Some(AMQPValue::LongString(s)) => format!("'{}'", String::from_utf8_lossy(s.as_bytes())),
        Some(AMQPValue::ShortString(s)) => format!("'{}'", s.as_str()),
        Some(other) => format!("{other:?}"),
    }
}

/// Deliveries of one message a quorum queue allows when neither its arguments nor a
/// policy set `delivery-limit` (RabbitMQ 4's default); past it the message is dropped or
/// dead-lettered.
pub const QUORUM_DELIVERY_LIMIT: u64 = 20;

/// Whether a declaration asks for a quorum queue (`x-queue-type: quorum`).
pub fn is_quorum(def: &QueueDef) -> bool {
    declared_type(def) == Some(b"quorum".as_slice())
}

/// The declaration's `x-queue-type`, if it gives one as a string.
fn declared_type(def: &QueueDef) -> Option<&[u8]> {
    match def.arguments.inner().get("x-queue-type")? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

/// Whether a declaration is of a classic queue (no `x-queue-type`, or `classic`).
pub(super) fn is_classic(def: &QueueDef) -> bool {
    def.arguments.inner().get("x-queue-type").is_none()
        || declared_type(def) == Some(b"classic".as_slice())
}

/// A quorum queue is durable, not exclusive and not auto-delete: 406 naming the property
/// otherwise, as RabbitMQ.
fn check_quorum_properties(def: &QueueDef, vhost: &str) -> Result<(), AmqpError> {
    let refused = if !def.durable {
        "non-durable"
    } else if def.exclusive_owner.is_some() {
        "exclusive-owner"
    } else if def.auto_delete {
        "auto-delete"
    } else {
        return Ok(());
    };
    Err(amqp_err!(
        PreconditionFailed,
        "invalid property '{}' for queue '{}' in vhost '{}'",
        refused,
        def.name,
        vhost
    ))
}

/// Arguments only quorum queues take: 406 on any other queue, as RabbitMQ words it.
fn check_classic_arguments(def: &QueueDef, vhost: &str) -> Result<(), AmqpError> {
    const QUORUM_ONLY: &[&str] = &["x-dead-letter-strategy"];
    match QUORUM_ONLY
        .iter()
        .find(|a| def.arguments.inner().contains_key(**a))
    {
        None => Ok(()),
        Some(arg) => Err(amqp_err!(
            PreconditionFailed,
            "invalid arg '{}' for queue '{}' in vhost '{}' of queue type rabbit_classic_queue",
            arg,
            def.name,
            vhost
        )),
    }
}

/// A random server-generated name suffix, as RabbitMQ's `amq.gen-` names (22 url-safe
/// base64 characters).
pub fn generated_name(prefix: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut n: u128 = rand::random();
    let mut s = String::with_capacity(prefix.len() + 22);
    s.push_str(prefix);
    for _ in 0..22 {
        s.push(ALPHABET[(n & 63) as usize] as char);
        n >>= 6;
    }
    s
}

impl VHost {
    /// A vhost with the default exchange and the `amq.*` built-ins.
    pub fn new(
        name: &str,
        store: Option<Store>,
        paging: crate::queue::Paging,
        msg_ids: Arc<AtomicU64>,
        cluster: Arc<OnceLock<ClusterLink>>,
    ) -> Arc<VHost> {
        let mut exchanges = HashMap::new();
        for (x, kind) in [
            ("", ExchangeKind::Direct),
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            let def = ExchangeDef {
                name: x.into(),
                kind,
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::default(),
            };
            exchanges.insert(x.to_string(), Exchange::new(def));
        }
        Arc::new_cyclic(|me| VHost {
            name: name.into(),
            exchanges: RwLock::new(exchanges),
            queues: RwLock::default(),
            store,
            paging,
            msg_ids,
            me: me.clone(),
            cluster,
            homes: RwLock::default(),
            policies: RwLock::default(),
        })
    }

    fn no_exchange(&self, name: &str) -> AmqpError {
        amqp_err!(NotFound, "no exchange '{}' in vhost '{}'", name, self.name)
    }

    fn no_queue(&self, name: &str) -> AmqpError {
        amqp_err!(NotFound, "no queue '{}' in vhost '{}'", name, self.name)
    }

    /// An exchange by name, or 404.
    pub fn exchange(&self, name: &str) -> Result<Arc<Exchange>, AmqpError> {
        lock_read(&self.exchanges)
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_exchange(name))
    }

    /// exchange.declare.
    pub fn declare_exchange(
        &self,
        def: ExchangeDef,
        passive: bool,
    ) -> Result<Arc<Exchange>, AmqpError> {
        // The default exchange cannot be declared, not even passively (RabbitMQ's 403).
        if def.name.is_empty() {
            return Err(amqp_err!(
                AccessRefused,
                "operation not permitted on the default exchange"
            ));
        }
        if passive {
            return self.exchange(&def.name);
        }
        let mut exchanges = lock_write(&self.exchanges);
        if let Some(x) = exchanges.get(&def.name) {
            self.check_exchange_equivalent(&x.def, &def)?;
            return Ok(x.clone());
        }
        if def.name.starts_with("amq.") {
            return Err(amqp_err!(
                AccessRefused,
                "exchange name '{}' contains reserved prefix 'amq.*'",
                def.name
            ));
        }
        let x = Exchange::new(def);
        self.apply_exchange_policy(&x);
        exchanges.insert(x.def.name.clone(), x.clone());
        if x.def.durable {
            self.persist(vec![StoreOp::PutDefinition {
                key: persist::exchange_key(&self.name, &x.def.name),
                value: StoredExchange::new(&self.name, &x.def).encode(),
            }]);
        }
        Ok(x)
    }

    fn check_exchange_equivalent(
        &self,
        current: &ExchangeDef,
        new: &ExchangeDef,
    ) -> Result<(), AmqpError> {
        let what = |arg: &str, received: &str, cur: &str| {
            amqp_err!(
                PreconditionFailed,
                "inequivalent arg '{}' for exchange '{}' in vhost '{}': received '{}' but current is '{}'",
                arg,
                current.name,
                self.name,
                received,
                cur
            )
        };
        if current.kind != new.kind {
            return Err(what("type", new.kind.as_str(), current.kind.as_str()));
        }
        if current.durable != new.durable {
            return Err(what(
                "durable",
                bool_text(new.durable),
                bool_text(current.durable),
            ));
        }
        if current.auto_delete != new.auto_delete {
            return Err(what(
                "auto_delete",
                bool_text(new.auto_delete),
                bool_text(current.auto_delete),
            ));
        }
        if current.internal != new.internal {
            return Err(what(
                "internal",
                bool_text(new.internal),
                bool_text(current.internal),
            ));
        }
        let key = "alternate-exchange";
        let (a, b) = (
            current.arguments.inner().get(key),
            new.arguments.inner().get(key),
        );
        if a != b {
            return Err(amqp_err!(
                PreconditionFailed,
                "inequivalent arg '{}' for exchange '{}' in vhost '{}': received {} but current is {}",
                key,
                current.name,
                self.name,
                value_text(b),
                value_text(a)
            ));
        }
        Ok(())
    }

    /// exchange.delete. Deleting a missing exchange succeeds, as in RabbitMQ.
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), AmqpError> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(amqp_err!(
                AccessRefused,
                "operation not permitted on exchange '{}'",
                name
            ));
        }
        let mut exchanges = lock_write(&self.exchanges);
        let Some(x) = exchanges.get(name).cloned() else {
            return Ok(());
        };
        if if_unused && x.has_bindings() {
            return Err(amqp_err!(
                PreconditionFailed,
                "exchange '{}' in vhost '{}' in use",
                name,
                self.name
            ));
        }
        exchanges.remove(name);
        let dest = Destination::Exchange(name.to_string());
        let mut unbound = Vec::new();
        let mut emptied = Vec::new();
        for other in exchanges.values() {
            let gone = other.unbind_all_to(&dest);
            if !gone.is_empty() && other.def.auto_delete && !other.has_bindings() {
                emptied.push(other.clone());
            }
            unbound.push((other.clone(), gone));
        }
        for e in &emptied {
            exchanges.remove(&e.def.name);
        }
        // binding_op reads the exchange table: only after our write lock is gone.
        drop(exchanges);
        let mut ops = Vec::new();
        for b in x.bindings() {
            self.binding_op(&x, &b, false, &mut ops);
        }
        for (other, gone) in &unbound {
            for b in gone {
                self.binding_op(other, b, false, &mut ops);
            }
        }
        for e in std::iter::once(&x).chain(emptied.iter()) {
            if e.def.durable {
                ops.push(StoreOp::DeleteDefinition {
                    key: persist::exchange_key(&self.name, &e.def.name),
                });
            }
        }
        self.persist(ops);
        Ok(())
    }

    /// exchange.bind (`destination` receives what `source` routes).
    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        args: FieldTable,
    ) -> Result<(), AmqpError> {
        let (src, _dst) = self.binding_ends(source, destination)?;
        validate_binding_args(src.def.kind, &args)?;
        self.add_binding(
            &src,
            Binding {
                dest: Destination::Exchange(destination.into()),
                key: key.into(),
                args,
            },
        );
        Ok(())
    }

    /// exchange.unbind.
    pub fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        args: &FieldTable,
    ) -> Result<(), AmqpError> {
        // Unbinding from or to an exchange that does not exist succeeds, as in RabbitMQ.
        let src = match self.binding_ends(source, destination) {
            Ok((src, _)) => src,
            Err(e) if e.code == crate::protocol::ReplyCode::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let dest = Destination::Exchange(destination.into());
        self.remove_binding(
            &src,
            Binding {
                dest,
                key: key.into(),
                args: args.clone(),
            },
        );
        Ok(())
    }

    /// Adds a binding (idempotent) and stores it when both ends are durable.
    fn add_binding(&self, source: &Exchange, b: Binding) {
        if source.bind(b.clone()) {
            let mut ops = Vec::new();
            self.binding_op(source, &b, true, &mut ops);
            self.persist(ops);
        }
    }

    /// Removes a binding if present: unstores it, and deletes an auto-delete source
    /// left without bindings.
    fn remove_binding(&self, source: &Arc<Exchange>, b: Binding) {
        if source.unbind(&b.dest, &b.key, &b.args) {
            let mut ops = Vec::new();
            self.binding_op(source, &b, false, &mut ops);
            self.persist(ops);
            self.auto_delete_exchange(source);
        }
    }

    fn binding_ends(
        &self,
        source: &str,
        destination: &str,
    ) -> Result<(Arc<Exchange>, Arc<Exchange>), AmqpError> {
        if source.is_empty() || destination.is_empty() {
            return Err(amqp_err!(
                AccessRefused,
                "operation not permitted on the default exchange"
            ));
        }
        Ok((self.exchange(source)?, self.exchange(destination)?))
    }

    fn auto_delete_exchange(&self, x: &Arc<Exchange>) {
        if x.def.auto_delete && !x.has_bindings() {
            let mut exchanges = lock_write(&self.exchanges);
            if exchanges
                .get(&x.def.name)
                .is_some_and(|cur| Arc::ptr_eq(cur, x))
                && !x.has_bindings()
            {
                exchanges.remove(&x.def.name);
                if x.def.durable {
                    self.persist(vec![StoreOp::DeleteDefinition {
                        key: persist::exchange_key(&self.name, &x.def.name),
                    }]);
                }
            }
        }
    }

    fn locked(&self, name: &str) -> AmqpError {
        amqp_err!(
            ResourceLocked,
            "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            name,
            self.name
        )
    }

    /// A queue that connection `conn` may use: 404 when missing, 405 when another
    /// connection's exclusive queue.
    pub fn queue(&self, name: &str, conn: u64) -> Result<Arc<Queue>, AmqpError> {
        let q = lock_read(&self.queues)
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_queue(name))?;
        match q.def.exclusive_owner {
            Some(owner) if owner != conn => Err(self.locked(name)),
            _ => Ok(q),
        }
    }

    /// queue.declare. Returns the queue and whether it was created now. An empty name
    /// gets a generated `amq.gen-` one; so does a name the caller already generated
    /// (`server_named`), which the reserved-prefix rule then does not apply to.
    pub fn declare_queue(
        &self,
        mut def: QueueDef,
        passive: bool,
        server_named: bool,
        conn: u64,
    ) -> Result<(Arc<Queue>, bool), AmqpError> {
        if passive {
            // Any use of a queue, a passive declare included, restarts its x-expires clock.
            let q = self.queue(&def.name, conn)?;
            q.touch();
            return Ok((q, false));
        }
        if def.name.is_empty() {
            def.name = generated_name("amq.gen-");
        } else if !server_named && def.name.starts_with("amq.") {
            return Err(amqp_err!(
                AccessRefused,
                "queue name '{}' contains reserved prefix 'amq.*'",
                def.name
            ));
        }
        let args = QueueArgs::parse(&def.arguments).map_err(|(arg, why)| {
            amqp_err!(
                PreconditionFailed,
                "invalid arg '{}' for queue '{}' in vhost '{}': {}",
                arg,
                def.name,
                self.name,
                why
            )
        })?;
        if is_quorum(&def) {
            check_quorum_properties(&def, &self.name)?;
        } else {
            check_classic_arguments(&def, &self.name)?;
        }
        let mut queues = lock_write(&self.queues);
        if let Some(q) = queues.get(&def.name) {
            let q = q.clone();
            drop(queues);
            if let Some(owner) = q.def.exclusive_owner
                && owner != conn
            {
                return Err(self.locked(&def.name));
            }
            self.check_queue_equivalent(&q.def, &def)?;
            q.touch();
            return Ok((q, false));
        }
        if is_quorum(&def)
            && let Some(why) = args.at_least_once_fallback()
        {
            tracing::warn!(
                queue = def.name,
                vhost = self.name,
                "{why}: dead letters go at most once"
            );
        }
        let q = self.new_queue(def, args);
        queues.insert(q.name().to_string(), q.clone());
        drop(queues);
        if let Some(qs) = q.store() {
            self.persist(vec![StoreOp::PutDefinition {
                key: qs.key.to_string(),
                value: StoredQueue::new(&self.name, &q.def).encode(),
            }]);
        }
        Ok((q, true))
    }

    /// A queue's settings: its declared ones with the policy in force applied.
    /// A quorum queue without a delivery limit of its own or from a policy has RabbitMQ
    /// 4's default one.
    fn effective_args(&self, def: &QueueDef, declared: QueueArgs) -> QueueArgs {
        let policies = lock_read(&self.policies);
        let mut args = match super::policy::in_force(&policies, true, &def.name) {
            Some(p) => declared.with_policy(&def.arguments, &p.definition),
            None => declared,
        };
        if args.delivery_limit.is_none() && is_quorum(def) {
            args.delivery_limit = Some(QUORUM_DELIVERY_LIMIT);
        }
        args
    }

    /// How a queue declared as `def` is replicated on a cluster: a quorum queue on
    /// `x-quorum-initial-group-size` nodes (default 3); a durable, non-exclusive classic
    /// queue as the mirroring policy in force for it says (RabbitMQ never mirrors
    /// exclusive queues); None for a queue kept on one node.
    pub fn replication(&self, def: &QueueDef) -> Option<Replication> {
        if is_quorum(def) {
            let size = super::cluster_defs::initial_group_size(def);
            return Some(Replication::Count(size.unwrap_or(DEFAULT_GROUP_SIZE)));
        }
        if !def.durable || def.exclusive_owner.is_some() || !is_classic(def) {
            return None;
        }
        let policies = lock_read(&self.policies);
        let policy = super::policy::in_force(&policies, true, &def.name)?;
        Some(match super::mirroring::of_definition(&policy.definition)? {
            Mirroring::All => Replication::Count(usize::MAX),
            Mirroring::Exactly(n) => Replication::Count(n),
            Mirroring::Nodes(names) => Replication::Nodes(names),
        })
    }

    /// Replaces the vhost's policies and applies the one now in force to every queue.
    pub fn set_policies(&self, policies: Vec<crate::auth::PolicyRecord>) {
        {
            let mut current = lock_write(&self.policies);
            if *current == policies {
                return;
            }
            *current = policies;
        }
        for q in self.queues() {
            let declared = QueueArgs::parse(&q.def.arguments).unwrap_or_default();
            q.set_args(self.effective_args(&q.def, declared));
        }
        for x in self.exchanges() {
            self.apply_exchange_policy(&x);
        }
        self.apply_mirroring();
    }

    /// Gives `x` the alternate exchange named by the policy in force for it, if any.
    fn apply_exchange_policy(&self, x: &Exchange) {
        let policies = lock_read(&self.policies);
        let alternate = super::policy::in_force(&policies, false, &x.def.name)
            .and_then(|p| p.definition.get("alternate-exchange"))
            .and_then(serde_json::Value::as_str)
            .map(String::from);
        x.set_policy_alternate(alternate);
    }

    fn new_queue(&self, def: QueueDef, args: QueueArgs) -> Arc<Queue> {
        let args = self.effective_args(&def, args);
        let store = self.store.as_ref().map(|store| QueueStore {
            store: store.clone(),
            key: persist::queue_key(&self.name, &def.name).into(),
            body_window: self.paging.body_window,
        });
        // Its transient messages' scratch key: a fresh one for every incarnation of
        // the name, so that a queue declared again never meets the old one's records.
        let spool = self.store.as_ref().map(|store| Spool {
            store: store.clone(),
            key: format!(
                "{}{}/{}/{}",
                crate::store::SCRATCH_PREFIX,
                self.name,
                def.name,
                self.next_msg_id()
            )
            .into(),
            ids: self.msg_ids.clone(),
            paging: self.paging.clone(),
        });
        let router: Weak<dyn DeadLetterRouter> = self.me.clone();
        let replicated = self.cluster.get().is_some() && self.replication(&def).is_some();
        let q = Queue::new(&self.name, def, args, store, Some(router));
        if replicated {
            q.mark_replicated();
        } else if let Some(spool) = spool {
            q.attach_spool(spool);
        }
        q
    }

    /// The node's store, if persistence is on.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// An id for a persistent message's stored copy (shared by the node).
    pub fn next_msg_id(&self) -> u64 {
        self.msg_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Timer work for every queue: TTL expiry at the heads, and deletion of queues
    /// unused for longer than their x-expires.
    pub fn tick(&self, now: u64) {
        self.apply_mirroring_now_and_then(now);
        let queues: Vec<Arc<Queue>> = lock_read(&self.queues).values().cloned().collect();
        for q in queues {
            // A queue homed on another node expires there.
            if q.tick(now) && self.remote_home(q.name()).is_none() {
                tracing::debug!(queue = q.name(), "queue expired (x-expires)");
                self.remove_queue(&q);
            }
        }
    }

    /// Sends definition changes to the store (not awaited: a confirm that depends on them
    /// is committed after them, since the store applies requests in order); on a
    /// clustered node they are proposed to the metadata group instead, and the connection
    /// answers once they are committed there.
    fn persist(&self, ops: Vec<StoreOp>) {
        if ops.is_empty() {
            return;
        }
        let ops = match self.cluster.get() {
            // (Decided on the live queue's declaration: a stored one has no owner.)
            Some(link) => link.propose(ops, |def| match self.find_queue(&def.name) {
                Some(q) => self.replication(&q.def),
                None => self.replication(def),
            }),
            None => ops,
        };
        if let Some(store) = &self.store
            && !ops.is_empty()
        {
            store.submit(ops);
        }
    }

    /// The store op for a binding, when both its ends are durable.
    fn binding_op(&self, source: &Exchange, b: &Binding, put: bool, ops: &mut Vec<StoreOp>) {
        if self.store.is_none() || !source.def.durable || source.def.name.is_empty() {
            return;
        }
        let (to_exchange, destination) = match &b.dest {
            Destination::Queue(q) if q.def.durable => (false, q.name().to_string()),
            Destination::Exchange(name) => match lock_read(&self.exchanges).get(name) {
                Some(x) if !x.def.durable => return,
                _ => (true, name.clone()),
            },
            Destination::Queue(_) => return,
        };
        let stored = StoredBinding {
            vhost: self.name.clone(),
            source: source.def.name.clone(),
            to_exchange,
            destination,
            routing_key: b.key.clone(),
            arguments: b.args.clone(),
        };
        let key = persist::binding_key(&self.name, &stored);
        ops.push(if put {
            StoreOp::PutDefinition {
                key,
                value: stored.encode(),
            }
        } else {
            StoreOp::DeleteDefinition { key }
        });
    }

    fn check_queue_equivalent(&self, current: &QueueDef, new: &QueueDef) -> Result<(), AmqpError> {
        let what = |arg: &str, received: bool, cur: bool| {
            amqp_err!(
                PreconditionFailed,
                "inequivalent arg '{}' for queue '{}' in vhost '{}': received '{}' but current is '{}'",
                arg,
                current.name,
                self.name,
                bool_text(received),
                bool_text(cur)
            )
        };
        if current.durable != new.durable {
            return Err(what("durable", new.durable, current.durable));
        }
        if current.exclusive_owner.is_some() != new.exclusive_owner.is_some() {
            return Err(self.locked(&current.name));
        }
        if current.auto_delete != new.auto_delete {
            return Err(what("auto_delete", new.auto_delete, current.auto_delete));
        }
        for key in EQUIVALENT_QUEUE_ARGS {
            let (a, b) = (
                current.arguments.inner().get(*key),
                new.arguments.inner().get(*key),
            );
            let same = match (a, b) {
                (Some(x), Some(y)) => x == y || crate::broker::exchange::loose_eq(x, y),
                (None, None) => true,
                _ => false,
            };
            if !same {
                return Err(amqp_err!(
                    PreconditionFailed,
                    "inequivalent arg '{}' for queue '{}' in vhost '{}': received {} but current is {}",
                    key,
                    current.name,
                    self.name,
                    value_text(b),
                    value_text(a)
                ));
            }
        }
        Ok(())
    }

    /// queue.bind.
    pub fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        args: FieldTable,
        conn: u64,
    ) -> Result<(), AmqpError> {
        let q = self.queue(queue, conn)?;
        if exchange.is_empty() {
            return Err(amqp_err!(
                AccessRefused,
                "operation not permitted on the default exchange"
            ));
        }
        let x = self.exchange(exchange)?;
        validate_binding_args(x.def.kind, &args)?;
        self.add_binding(
            &x,
            Binding {
                dest: Destination::Queue(q),
                key: key.into(),
                args,
            },
        );
        Ok(())
    }

    /// queue.unbind (unbinding what is not bound succeeds, as in RabbitMQ).
    pub fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        args: &FieldTable,
        conn: u64,
    ) -> Result<(), AmqpError> {
        if exchange.is_empty() {
            return Err(amqp_err!(
                AccessRefused,
                "operation not permitted on the default exchange"
            ));
        }
        // A binding whose queue or exchange does not exist is not there: unbind-ok, as
        // in RabbitMQ.
        let q = match self.queue(queue, conn) {
            Ok(q) => q,
            Err(e) if e.code == crate::protocol::ReplyCode::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let Ok(x) = self.exchange(exchange) else {
            return Ok(());
        };
        let dest = Destination::Queue(q);
        self.remove_binding(
            &x,
            Binding {
                dest,
                key: key.into(),
                args: args.clone(),
            },
        );
        Ok(())
    }

    /// queue.delete. Returns the number of messages it held. A missing queue is
    /// deleted already (0), as in RabbitMQ.
    pub fn delete_queue(
        &self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        conn: u64,
    ) -> Result<u32, AmqpError> {
        let q = match self.queue(name, conn) {
            Ok(q) => q,
            Err(e) if e.code == crate::protocol::ReplyCode::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        q.check_delete(if_unused, if_empty)?;
        Ok(self.remove_queue(&q))
    }

    /// Removes a queue from the registry and from every binding; cancels its consumers.
    pub fn remove_queue(&self, q: &Arc<Queue>) -> u32 {
        self.unregister_queue(q, true)
    }

    /// [`VHost::remove_queue`], storing (or proposing) the change when `record` (a
    /// clustered node mirroring a deletion agreed elsewhere does not).
    fn unregister_queue(&self, q: &Arc<Queue>, record: bool) -> u32 {
        {
            let mut queues = lock_write(&self.queues);
            match queues.get(q.name()) {
                Some(cur) if Arc::ptr_eq(cur, q) => {
                    queues.remove(q.name());
                }
                _ => return 0,
            }
        }
        lock_write(&self.homes).remove(q.name());
        let dest = Destination::Queue(q.clone());
        let exchanges: Vec<Arc<Exchange>> = lock_read(&self.exchanges).values().cloned().collect();
        let mut ops = Vec::new();
        for x in exchanges {
            let gone = x.unbind_all_to(&dest);
            for b in &gone {
                self.binding_op(&x, b, false, &mut ops);
            }
            if !gone.is_empty() && record {
                self.auto_delete_exchange(&x);
            }
        }
        if q.def.durable && self.store.is_some() {
            ops.push(StoreOp::DeleteDefinition {
                key: persist::queue_key(&self.name, q.name()),
            });
        }
        if record {
            self.persist(ops);
        }
        q.mark_deleted()
    }

    /// Every queue, in no particular order (listings, the management API).
    pub fn queues(&self) -> Vec<Arc<Queue>> {
        lock_read(&self.queues).values().cloned().collect()
    }

    /// Every exchange, the built-in ones included, in no particular order.
    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        lock_read(&self.exchanges).values().cloned().collect()
    }

    /// Deletes every queue (cancelling consumers) and every exchange but the built-in
    /// ones, with their stored records: the vhost itself is being deleted.
    pub fn delete_everything(&self) {
        for q in self.queues() {
            self.remove_queue(&q);
        }
        for x in self.exchanges() {
            let name = &x.def.name;
            if !name.is_empty() && !name.starts_with("amq.") {
                let _ = self.delete_exchange(name, false);
            }
        }
    }

    /// A message another node routed to `queues` of this vhost (those homed here take
    /// it): its persistent copies go to the store, it is enqueued now (a replicated
    /// queue proposes it to its log), and the future is ready once the copies are
    /// durable and the replicated queues committed it (a replicated queue whose leader
    /// moved gets it through this node's member of its group, which relays it to the
    /// leader). Also says whether a queue refused it (x-overflow reject-publish, or a
    /// classic queue not homed here any more): the publisher then gets a nack.
    pub fn enqueue_forwarded(
        &self,
        queues: &[String],
        msg: Message,
    ) -> (bool, impl Future<Output = bool> + Send + 'static) {
        let msg = Arc::new(msg);
        let mut refused = false;
        let mut targets: Vec<Arc<Queue>> = Vec::new();
        let mut replicated = Vec::new();
        for name in queues {
            let Some(q) = self.find_queue(name) else {
                continue;
            };
            let home_here = self.remote_home(name).is_none();
            if q.is_replicated() && (home_here || q.replica().is_some_and(|log| log.is_proposing()))
            {
                // (Also when its leader has moved: this node's member relays it there.)
                let (ack, committed) = tokio::sync::oneshot::channel();
                q.enqueue_tracked(msg.clone(), Some(ack));
                replicated.push(committed);
                continue;
            }
            if !home_here {
                refused = true;
                continue;
            }
            if q.refuses(msg.size()) {
                refused = true;
                continue;
            }
            targets.push(q);
        }
        let mut writes = Writes::default();
        writes.publish(&targets, &msg);
        let durable = match &self.store {
            Some(store) if !writes.is_empty() => {
                Some(Journal::new(store.clone()).append_wait(writes))
            }
            _ => None,
        };
        for q in &targets {
            if q.enqueue(msg.clone()) == crate::queue::Enqueued::Rejected {
                refused = true;
            }
        }
        let committed = async move {
            let mut all = true;
            for r in replicated {
                all &= r.await.unwrap_or(false);
            }
            all
        };
        (refused, async move {
            if let Some(d) = durable {
                d.await;
            }
            committed.await
        })
    }

    /// Publishes a message made by the broker itself (the management API's publish):
    /// routes it, stores persistent copies and waits for that commit, then enqueues.
    /// Returns whether some queue took it.
    pub async fn publish(&self, msg: Message) -> Result<bool, AmqpError> {
        let msg = Arc::new(msg);
        let mut queues = self.route(
            &msg.exchange,
            &msg.routing_key,
            msg.properties.headers().as_ref(),
        )?;
        queues.retain(|q| !q.refuses(msg.size()));
        let mut writes = Writes::default();
        writes.publish(&queues, &msg);
        if let Some(store) = &self.store
            && !writes.is_empty()
        {
            Journal::new(store.clone()).append_wait(writes).await;
        }
        let mut routed = false;
        for q in &queues {
            // A queue that refuses it (lost a race for its last place) removes its copy.
            routed |= q.enqueue(msg.clone()) != crate::queue::Enqueued::Rejected;
        }
        Ok(routed)
    }

    /// Deletes the exclusive queues of a closing connection.
    pub fn remove_exclusive_queues(&self, conn: u64) {
        let owned: Vec<Arc<Queue>> = lock_read(&self.queues)
            .values()
            .filter(|q| q.def.exclusive_owner == Some(conn))
            .cloned()
            .collect();
        for q in owned {
            self.remove_queue(&q);
        }
    }

    /// Routes a message: the queues it goes to, following exchange-to-exchange bindings
    /// and alternate exchanges, each queue once. 404 when the exchange is missing.
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> Result<Vec<Arc<Queue>>, AmqpError> {
        self.route_keys(exchange, &[routing_key], headers)
    }

    /// `route` for a message with several routing keys (sender-selected distribution):
    /// the union of where each key leads, each queue once.
    pub fn route_keys(
        &self,
        exchange: &str,
        routing_keys: &[&str],
        headers: Option<&FieldTable>,
    ) -> Result<Vec<Arc<Queue>>, AmqpError> {
        let mut queues: Vec<Arc<Queue>> = Vec::new();
        if exchange.is_empty() {
            let all = lock_read(&self.queues);
            for key in routing_keys {
                if let Some(q) = all.get(*key)
                    && !queues.iter().any(|have| Arc::ptr_eq(have, q))
                {
                    queues.push(q.clone());
                }
            }
            return Ok(queues);
        }
        let exchanges = lock_read(&self.exchanges);
        let first = exchanges
            .get(exchange)
            .ok_or_else(|| self.no_exchange(exchange))?;
        if first.def.internal {
            return Err(amqp_err!(
                AccessRefused,
                "cannot publish to internal exchange '{}' in vhost '{}'",
                exchange,
                self.name
            ));
        }
        let mut visited: Seen<&str> = Seen::default();
        let mut routed: Seen<*const Queue> = Seen::default();
        let mut pending: Vec<&Arc<Exchange>> = vec![first];
        let mut dests = Vec::new();
        while let Some(x) = pending.pop() {
            if !visited.insert(&x.def.name) {
                continue;
            }
            dests.clear();
            for key in routing_keys {
                x.route(key, headers, &mut dests);
            }
            if dests.is_empty()
                && let Some(ae) = x.alternate().and_then(|n| exchanges.get(n.as_str()))
            {
                pending.push(ae);
            }
            for d in dests.drain(..) {
                match d {
                    Destination::Queue(q) => {
                        if routed.insert(Arc::as_ptr(&q)) {
                            queues.push(q);
                        }
                    }
                    Destination::Exchange(name) => {
                        if let Some(next) = exchanges.get(&name) {
                            pending.push(next);
                        }
                    }
                }
            }
        }
        Ok(queues)
    }
}

/// A set for routing's "each once" checks: a short list kept inline while small (the
/// usual case: no hashing, no allocation), a hash set once bindings fan out widely, so
/// that routing stays linear in the bindings followed.
struct Seen<T> {
    few: [Option<T>; SEEN_FEW],
    len: usize,
    many: std::collections::HashSet<T>,
}

/// Items a `Seen` holds inline before it moves them to its hash set.
const SEEN_FEW: usize = 16;

impl<T: Copy> Default for Seen<T> {
    fn default() -> Self {
        Seen {
            few: [None; SEEN_FEW],
            len: 0,
            many: std::collections::HashSet::new(),
        }
    }
}

impl<T: std::hash::Hash + Eq + Copy> Seen<T> {
    /// Adds `item`; false when it was there already.
    fn insert(&mut self, item: T) -> bool {
        if !self.many.is_empty() {
            return self.many.insert(item);
        }
        if self.few[..self.len].contains(&Some(item)) {
            return false;
        }
        if self.len < SEEN_FEW {
            self.few[self.len] = Some(item);
            self.len += 1;
        } else {
            self.many.extend(self.few.iter().flatten().copied());
            self.many.insert(item);
        }
        true
    }
}

/// Rebuilding a vhost from the store at start.
impl VHost {
    /// Re-creates a durable exchange read back from the store.
    pub fn restore_exchange(&self, def: ExchangeDef) {
        lock_write(&self.exchanges)
            .entry(def.name.clone())
            .or_insert_with(|| {
                let x = Exchange::new(def);
                self.apply_exchange_policy(&x);
                x
            });
    }

    /// Re-creates a durable queue read back from the store.
    pub fn restore_queue(&self, def: QueueDef) -> Arc<Queue> {
        let args = QueueArgs::parse(&def.arguments).unwrap_or_default();
        let q = self.new_queue(def, args);
        lock_write(&self.queues).insert(q.name().to_string(), q.clone());
        q
    }

    /// Re-creates a binding read back from the store (ends that no longer exist are skipped).
    pub fn restore_binding(&self, b: StoredBinding) {
        let Ok(source) = self.exchange(&b.source) else {
            return;
        };
        let dest = if b.to_exchange {
            Destination::Exchange(b.destination)
        } else {
            match lock_read(&self.queues).get(&b.destination) {
                Some(q) => Destination::Queue(q.clone()),
                None => return,
            }
        };
        source.bind(Binding {
            dest,
            key: b.routing_key,
            args: b.arguments,
        });
    }

    /// A queue by name regardless of owner (recovery).
    pub fn find_queue(&self, name: &str) -> Option<Arc<Queue>> {
        lock_read(&self.queues).get(name).cloned()
    }
}

/// A clustered node's vhost following the definitions the metadata group agreed: these
/// change the vhost without storing or proposing anything (the change is already agreed),
/// and do nothing when the vhost already matches (the node that proposed a change made
/// it in advance).
impl VHost {
    /// Whether the metadata group names this node leader of replicated queue `queue`
    /// since `term` (true on a node that is not clustered).
    pub fn replica_leader_announced(&self, queue: &str, term: u64) -> bool {
        self.cluster.get().is_none_or(|link| {
            link.announced_leader(&self.name, queue) == Some((link.node.clone(), term))
        })
    }

    /// Where a replicated queue's messages are now: `None` on the node leading its group,
    /// else the leader this node knows.
    pub fn set_replica_home(&self, queue: &str, leader: Option<String>) {
        let mut homes = lock_write(&self.homes);
        match leader {
            Some(l) => homes.insert(queue.to_string(), l),
            None => homes.remove(queue),
        };
    }

    /// The node's cluster side, when clustered.
    pub(super) fn cluster_link(&self) -> Option<&ClusterLink> {
        self.cluster.get()
    }

    /// Tells every node that this one leads replicated queue `queue` since `term`.
    pub fn announce_replica_leader(&self, queue: &str, term: u64) {
        if let Some(link) = self.cluster.get() {
            link.announce_leader(&self.name, queue, term);
        }
    }

    /// The node that hosts a queue now, when that is another node: the one lookup
    /// publishes (forwarded), consumers, gets, purges and counts (proxied, see
    /// `broker::remote_consume`) go by: a classic durable queue's home, a replicated
    /// queue's leader.
    pub fn remote_home(&self, queue: &str) -> Option<String> {
        lock_read(&self.homes).get(queue).cloned()
    }

    /// 406 when `q` is homed on another node: a transaction cannot publish to it yet.
    pub fn check_local(&self, q: &Queue) -> Result<(), AmqpError> {
        match self.remote_home(q.name()) {
            None => Ok(()),
            Some(home) => Err(amqp_err!(
                PreconditionFailed,
                "queue '{}' in vhost '{}' is homed on node '{}'; transactions that publish \
                 to it through another node are not supported yet: connect to '{}'",
                q.name(),
                self.name,
                home,
                home
            )),
        }
    }

    /// Whether some queue of this vhost is homed on another node (publishes check their
    /// queues only then).
    pub fn has_remote_queues(&self) -> bool {
        !lock_read(&self.homes).is_empty()
    }

    /// An agreed durable exchange: created, or replaced when its declaration differs.
    pub fn mirror_exchange(&self, def: ExchangeDef) {
        let mut exchanges = lock_write(&self.exchanges);
        if exchanges.get(&def.name).is_some_and(|x| x.def == def) {
            return;
        }
        let x = Exchange::new(def);
        self.apply_exchange_policy(&x);
        if let Some(old) = exchanges.insert(x.def.name.clone(), x.clone()) {
            for b in old.bindings() {
                x.bind(b);
            }
        }
    }

    /// An agreed exchange deletion: the exchange and every binding to it go.
    pub fn mirror_exchange_gone(&self, name: &str) {
        let mut exchanges = lock_write(&self.exchanges);
        if exchanges.remove(name).is_none() {
            return;
        }
        let dest = Destination::Exchange(name.to_string());
        for other in exchanges.values() {
            other.unbind_all_to(&dest);
        }
    }

    /// An agreed durable queue, homed on `home` (`None`: this node, which keeps its
    /// messages). A queue of the same name that differs is replaced.
    pub fn mirror_queue(&self, def: QueueDef, home: Option<String>) {
        let existing = lock_read(&self.queues).get(&def.name).cloned();
        let same_home = self.remote_home(&def.name) == home;
        if let Some(q) = &existing {
            if q.def.durable
                && q.def.auto_delete == def.auto_delete
                && q.def.arguments == def.arguments
                && same_home
            {
                return;
            }
            self.unregister_queue(q, false);
        }
        let name = def.name.clone();
        let q = self.restore_queue(def);
        let mut homes = lock_write(&self.homes);
        match home {
            Some(h) => homes.insert(name, h),
            None => homes.remove(&name),
        };
        drop(homes);
        // Bindings the replaced queue had point at it: move them to the new one.
        if let Some(old) = existing {
            let old_dest = Destination::Queue(old);
            for x in self.exchanges() {
                for mut b in x.unbind_all_to(&old_dest) {
                    b.dest = Destination::Queue(q.clone());
                    x.bind(b);
                }
            }
        }
    }

    /// Puts a new incarnation of queue `old` in its place (same definition, bindings
    /// moved over), leaving `old` as it is: a classic queue whose messages went to its
    /// replicated incarnation ([`Queue::surrender`]), so that what still refers to the
    /// old one (deliveries not yet settled, publishes under way) never touches the new.
    pub fn renew_queue(&self, old: &Arc<Queue>) -> Option<Arc<Queue>> {
        {
            let mut queues = lock_write(&self.queues);
            match queues.get(old.name()) {
                Some(cur) if Arc::ptr_eq(cur, old) => {
                    queues.remove(old.name());
                }
                _ => return None,
            }
        }
        let q = self.restore_queue(old.def.clone());
        let old_dest = Destination::Queue(old.clone());
        for x in self.exchanges() {
            for mut b in x.unbind_all_to(&old_dest) {
                b.dest = Destination::Queue(q.clone());
                x.bind(b);
            }
        }
        Some(q)
    }

    /// An agreed queue deletion.
    pub fn mirror_queue_gone(&self, name: &str) {
        if let Some(q) = self.find_queue(name) {
            self.unregister_queue(&q, false);
        }
    }

    /// An agreed binding deletion.
    pub fn mirror_binding_gone(&self, b: &StoredBinding) {
        let Ok(source) = self.exchange(&b.source) else {
            return;
        };
        let dest = if b.to_exchange {
            Destination::Exchange(b.destination.clone())
        } else {
            match self.find_queue(&b.destination) {
                Some(q) => Destination::Queue(q),
                None => return,
            }
        };
        source.unbind(&dest, &b.routing_key, &b.arguments);
    }

    /// The durable definitions of this vhost as the store (or the metadata group) holds
    /// them: `(key, value)` of every durable exchange, queue and binding between durable
    /// ends. A resync compares them with the agreed ones.
    pub fn durable_definitions(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let exchanges = self.exchanges();
        for x in &exchanges {
            if x.def.durable && !x.def.name.is_empty() && !x.def.name.starts_with("amq.") {
                out.push((
                    persist::exchange_key(&self.name, &x.def.name),
                    StoredExchange::new(&self.name, &x.def).encode(),
                ));
            }
        }
        for q in self.queues() {
            if q.def.durable {
                out.push((
                    persist::queue_key(&self.name, q.name()),
                    StoredQueue::new(&self.name, &q.def).encode(),
                ));
            }
        }
        for x in &exchanges {
            let mut ops = Vec::new();
            for b in x.bindings() {
                self.binding_op(x, &b, true, &mut ops);
            }
            for op in ops {
                if let StoreOp::PutDefinition { key, value } = op {
                    out.push((key, value));
                }
            }
        }
        out
    }
}
