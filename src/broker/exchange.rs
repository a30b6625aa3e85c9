//! Exchanges and their bindings. Routing is the exchange's only job: from a routing key
//! and headers to a set of destinations, over an index built for its type (a hash map for
//! direct, a list for fanout, a trie for topic, a list of parsed patterns for headers).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use amq_protocol::types::{AMQPValue, FieldTable};

use super::field_type;
use crate::protocol::{AmqpError, reply::amqp_err};
use crate::queue::Queue;
use crate::queue::args::int_value;

/// The four exchange types of AMQP 0-9-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Every binding.
    Fanout,
    /// Dotted patterns with `*` and `#`.
    Topic,
    /// Header matching (x-match).
    Headers,
}

impl ExchangeKind {
    /// Parses the type name of exchange.declare.
    pub fn parse(name: &str) -> Option<ExchangeKind> {
        match name {
            "direct" => Some(ExchangeKind::Direct),
            "fanout" => Some(ExchangeKind::Fanout),
            "topic" => Some(ExchangeKind::Topic),
            "headers" => Some(ExchangeKind::Headers),
            _ => None,
        }
    }

    /// The type name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Declared properties of an exchange, compared on redeclare.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeDef {
    /// Name.
    pub name: String,
    /// Type.
    pub kind: ExchangeKind,
    /// Survives restarts.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Not publishable by clients, only by exchange-to-exchange bindings.
    pub internal: bool,
    /// x-arguments (alternate-exchange).
    pub arguments: FieldTable,
}

/// Where a binding leads.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A queue.
    Queue(Arc<Queue>),
    /// Another exchange, by name (exchange-to-exchange binding).
    Exchange(String),
}

impl Destination {
    /// Same destination? Queues by identity, exchanges by name.
    pub fn same(&self, other: &Destination) -> bool {
        match (self, other) {
            (Destination::Queue(a), Destination::Queue(b)) => Arc::ptr_eq(a, b),
            (Destination::Exchange(a), Destination::Exchange(b)) => a == b,
            _ => false,
        }
    }
}

/// One binding of this exchange.
#[derive(Debug, Clone)]
pub struct Binding {
    /// Target.
    pub dest: Destination,
    /// Binding key.
    pub key: String,
    /// Binding arguments (headers patterns).
    pub args: FieldTable,
}

/// The words of a topic routing or binding key: the empty key has none.
fn topic_words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

#[derive(Debug, Default)]
struct TopicNode {
    words: HashMap<String, TopicNode>,
    star: Option<Box<TopicNode>>,
    hash: Option<Box<TopicNode>>,
    dests: Vec<Destination>,
}

impl TopicNode {
    /// Adds a binding pattern. Consecutive `#` words match exactly what one does, so they
    /// are stored as one: the trie never holds `#` below `#`.
    fn insert(&mut self, words: &[&str], dest: Destination) {
        let mut node = self;
        let mut previous_hash = false;
        for w in words {
            let is_hash = *w == "#";
            if is_hash && previous_hash {
                continue;
            }
            previous_hash = is_hash;
            node = match *w {
                "*" => node.star.get_or_insert_default(),
                "#" => node.hash.get_or_insert_default(),
                w => node.words.entry(w.to_string()).or_default(),
            };
        }
        node.dests.push(dest);
    }

    /// Every destination whose pattern matches `words`, each binding once.
    ///
    /// A walk over (trie node, words consumed) pairs with an explicit stack. Without `#`
    /// each pair is reached by one path only; a `#` node can be reached at the same
    /// position along many paths, so those pairs are remembered and visited once. The work
    /// is then bounded by nodes x (words + 1)^2, whatever patterns are bound, instead of
    /// growing exponentially with the number of `#` in a pattern.
    fn collect<'a>(&'a self, words: &[&str], out: &mut Vec<&'a Destination>) {
        let mut seen_hash: HashSet<(*const TopicNode, usize)> = HashSet::new();
        let mut stack: Vec<(&TopicNode, usize)> = vec![(self, 0)];
        while let Some((node, pos)) = stack.pop() {
            if let Some(hash) = &node.hash {
                // `#` takes zero or more words.
                for at in pos..=words.len() {
                    if seen_hash.insert((&**hash as *const TopicNode, at)) {
                        stack.push((hash, at));
                    }
                }
            }
            match words.get(pos) {
                None => out.extend(node.dests.iter()),
                Some(w) => {
                    if let Some(child) = node.words.get(*w) {
                        stack.push((child, pos + 1));
                    }
                    if let Some(star) = &node.star {
                        stack.push((star, pos + 1));
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

#[derive(Debug, Default)]
struct Bindings {
    list: Vec<Binding>,
    direct: HashMap<String, Vec<Destination>>,
    topic: TopicNode,
}

impl Bindings {
    fn index(&mut self, kind: ExchangeKind, b: &Binding) {
        match kind {
            ExchangeKind::Direct => self
                .direct
                .entry(b.key.clone())
                .or_default()
                .push(b.dest.clone()),
            ExchangeKind::Topic => {
                let words: Vec<&str> = topic_words(&b.key);
                self.topic.insert(&words, b.dest.clone());
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
    }

    fn rebuild(&mut self, kind: ExchangeKind) {
        self.direct.clear();
        self.topic = TopicNode::default();
        let list = std::mem::take(&mut self.list);
        for b in &list {
            self.index(kind, b);
        }
        self.list = list;
    }
}

/// An exchange with its bindings.
#[derive(Debug)]
pub struct Exchange {
    /// Its declaration.
    pub def: ExchangeDef,
    bindings: RwLock<Bindings>,
    /// The alternate exchange a policy names (the `alternate-exchange` argument wins).
    policy_alternate: RwLock<Option<String>>,
}

fn args_equal(a: &FieldTable, b: &FieldTable) -> bool {
    a.inner() == b.inner()
}

impl Exchange {
    /// A new exchange with no bindings.
    pub fn new(def: ExchangeDef) -> Arc<Exchange> {
        Arc::new(Exchange {
            def,
            bindings: RwLock::default(),
            policy_alternate: RwLock::default(),
        })
    }

    /// The alternate exchange: named by the `alternate-exchange` argument, or else by
    /// the policy in force (RabbitMQ's precedence).
    pub fn alternate(&self) -> Option<String> {
        match self.def.arguments.inner().get("alternate-exchange") {
            Some(AMQPValue::LongString(s)) => {
                std::str::from_utf8(s.as_bytes()).ok().map(String::from)
            }
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
            _ => self
                .policy_alternate
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Sets the alternate exchange the policy in force names (`None`: none).
    pub fn set_policy_alternate(&self, alternate: Option<String>) {
        *self
            .policy_alternate
            .write()
            .unwrap_or_else(|p| p.into_inner()) = alternate;
    }

    /// Adds a binding; false when an identical one exists (binding is idempotent).
    pub fn bind(&self, binding: Binding) -> bool {
        let mut b = self.bindings.write().unwrap_or_else(|p| p.into_inner());
        if b.list.iter().any(|x| {
            x.dest.same(&binding.dest) && x.key == binding.key && args_equal(&x.args, &binding.args)
        }) {
            return false;
        }
        b.index(self.def.kind, &binding);
        b.list.push(binding);
        true
    }

    /// Removes a binding; false when there was none.
    pub fn unbind(&self, dest: &Destination, key: &str, args: &FieldTable) -> bool {
        let mut b = self.bindings.write().unwrap_or_else(|p| p.into_inner());
        let before = b.list.len();
        b.list
            .retain(|x| !(x.dest.same(dest) && x.key == key && args_equal(&x.args, args)));
        let removed = b.list.len() != before;
        if removed {
            b.rebuild(self.def.kind);
        }
        removed
    }

    /// Removes every binding to `dest`; returns them.
    pub fn unbind_all_to(&self, dest: &Destination) -> Vec<Binding> {
        let mut b = self.bindings.write().unwrap_or_else(|p| p.into_inner());
        let (gone, kept): (Vec<Binding>, Vec<Binding>) = std::mem::take(&mut b.list)
            .into_iter()
            .partition(|x| x.dest.same(dest));
        b.list = kept;
        if !gone.is_empty() {
            b.rebuild(self.def.kind);
        }
        gone
    }

    /// Whether a binding exists (for queue.bind idempotence checks and tests).
    pub fn has_bindings(&self) -> bool {
        !self
            .bindings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .list
            .is_empty()
    }

    /// A copy of the bindings (for persistence and management).
    pub fn bindings(&self) -> Vec<Binding> {
        self.bindings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .list
            .clone()
    }

    /// Destinations for a message with this routing key and headers.
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<Destination>,
    ) {
        let b = self.bindings.read().unwrap_or_else(|p| p.into_inner());
        match self.def.kind {
            ExchangeKind::Direct => {
                if let Some(d) = b.direct.get(routing_key) {
                    out.extend(d.iter().cloned());
                }
            }
            ExchangeKind::Fanout => out.extend(b.list.iter().map(|x| x.dest.clone())),
            ExchangeKind::Topic => {
                let words: Vec<&str> = topic_words(routing_key);
                let mut found = Vec::new();
                b.topic.collect(&words, &mut found);
                out.extend(found.into_iter().cloned());
            }
            ExchangeKind::Headers => {
                let empty = FieldTable::default();
                let headers = headers.unwrap_or(&empty);
                for x in &b.list {
                    if headers_match(&x.args, headers) {
                        out.push(x.dest.clone());
                    }
                }
            }
        }
    }
}

/// RabbitMQ's headers-exchange rule: x-match all (default) / any, and the `-with-x`
/// variants that also compare `x-` keys. A binding value of type void only asks for the
/// key to be present.
fn headers_match(args: &FieldTable, headers: &FieldTable) -> bool {
    let mode = match args.inner().get("x-match") {
        Some(AMQPValue::LongString(s)) => match s.as_bytes() {
            b"any" => XMatch::Any,
            b"all-with-x" => XMatch::AllWithX,
            b"any-with-x" => XMatch::AnyWithX,
            _ => XMatch::All,
        },
        Some(AMQPValue::ShortString(s)) => match s.as_str() {
            "any" => XMatch::Any,
            "all-with-x" => XMatch::AllWithX,
            "any-with-x" => XMatch::AnyWithX,
            _ => XMatch::All,
        },
        _ => XMatch::All,
    };
    let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
    let mut patterns = args
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.as_str().starts_with("x-")));
    let matches_one =
        |(k, v): (&amq_protocol::types::ShortString, &AMQPValue)| match headers.inner().get(k) {
            None => false,
            Some(h) => matches!(v, AMQPValue::Void) || header_value_eq(v, h),
        };
    match mode {
        XMatch::All | XMatch::AllWithX => patterns.all(matches_one),
        XMatch::Any | XMatch::AnyWithX => patterns.any(matches_one),
    }
}

/// Equality as RabbitMQ's headers exchange sees it: strings compare by bytes whatever
/// their string type, integers by value whatever their width.
fn value_eq(a: &AMQPValue, b: &AMQPValue) -> bool {
    fn text(v: &AMQPValue) -> Option<&[u8]> {
        match v {
            AMQPValue::LongString(s) => Some(s.as_bytes()),
            AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
            _ => None,
        }
    }
    if let (Some(x), Some(y)) = (text(a), text(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (int_value(a), int_value(b)) {
        return x == y;
    }
    a == b
}

/// Equality of a binding's value and a header's, as RabbitMQ's headers exchange
/// compares them: numbers by value whatever their type (an int binding matches a
/// byte, short, long, timestamp, float or double header of the same value), strings
/// by bytes, anything else by type and value.
fn header_value_eq(a: &AMQPValue, b: &AMQPValue) -> bool {
    fn number(v: &AMQPValue) -> Option<f64> {
        match v {
            AMQPValue::Float(x) => Some(*x as f64),
            AMQPValue::Double(x) => Some(*x),
            _ => None,
        }
    }
    if let (Some(x), Some(y)) = (int_value(a), int_value(b)) {
        return x == y;
    }
    match (
        number(a).or_else(|| int_value(a).map(|i| i as f64)),
        number(b).or_else(|| int_value(b).map(|i| i as f64)),
    ) {
        (Some(x), Some(y)) => x == y,
        _ => value_eq(a, b),
    }
}

/// Checks a binding's arguments as the exchange type requires: for a headers
/// exchange, `x-match` must be a long string all, any, all-with-x or any-with-x
/// (RabbitMQ's 406 texts).
pub fn validate_binding_args(kind: ExchangeKind, args: &FieldTable) -> Result<(), AmqpError> {
    if kind != ExchangeKind::Headers {
        return Ok(());
    }
    let text = match args.inner().get("x-match") {
        None => return Ok(()),
        Some(AMQPValue::LongString(s)) => s.as_bytes().to_vec(),
        Some(AMQPValue::ShortString(s)) => s.as_str().as_bytes().to_vec(),
        Some(other) => {
            return Err(amqp_err!(
                PreconditionFailed,
                "Invalid x-match field type {} (value {}); expected longstr",
                field_type::rabbit_name(other),
                field_type::rabbit_value(other)
            ));
        }
    };
    match text.as_slice() {
        b"all" | b"any" | b"all-with-x" | b"any-with-x" => Ok(()),
        other => Err(amqp_err!(
            PreconditionFailed,
            "Invalid x-match field value <<\"{}\">>; expected all, any, all-with-x, or any-with-x",
            String::from_utf8_lossy(other)
        )),
    }
}

/// Loose equality of argument values (integers of different widths are equal), used
/// by redeclare equivalence checks.
pub fn loose_eq(a: &AMQPValue, b: &AMQPValue) -> bool {
    value_eq(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueDef;

    fn queue(name: &str) -> Arc<Queue> {
        Queue::new(
            "/",
            QueueDef {
                name: name.into(),
                durable: false,
                exclusive_owner: None,
                auto_delete: false,
                arguments: FieldTable::default(),
            },
            Default::default(),
            None,
            None,
        )
    }

    fn routed(x: &Exchange, key: &str, headers: Option<&FieldTable>) -> Vec<String> {
        let mut out = Vec::new();
        x.route(key, headers, &mut out);
        let mut names: Vec<String> = out
            .into_iter()
            .map(|d| match d {
                Destination::Queue(q) => q.name().to_string(),
                Destination::Exchange(e) => format!("x:{e}"),
            })
            .collect();
        names.sort();
        names
    }

    fn exchange(kind: ExchangeKind) -> Arc<Exchange> {
        Exchange::new(ExchangeDef {
            name: "x".into(),
            kind,
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        })
    }

    #[test]
    fn topic_star_and_hash() {
        let x = exchange(ExchangeKind::Topic);
        for (q, key) in [
            ("a", "a.*.c"),
            ("b", "a.#"),
            ("c", "#"),
            ("d", "*.b.#.z"),
            ("e", "a.b.c"),
        ] {
            x.bind(Binding {
                dest: Destination::Queue(queue(q)),
                key: key.into(),
                args: FieldTable::default(),
            });
        }
        assert_eq!(routed(&x, "a.b.c", None), ["a", "b", "c", "e"]);
        assert_eq!(routed(&x, "a", None), ["b", "c"]);
        assert_eq!(routed(&x, "x.b.z", None), ["c", "d"]);
        assert_eq!(routed(&x, "x.b.q.r.z", None), ["c", "d"]);
        assert_eq!(routed(&x, "", None), ["c"]);
    }

    /// Patterns of many `#` against a long key: exponential work before, and every
    /// binding still matched once.
    #[test]
    fn topic_many_hashes_match_once_in_polynomial_work() {
        let x = exchange(ExchangeKind::Topic);
        let key = vec!["a"; 120].join(".");
        for (q, pattern) in [
            ("hashes", vec!["#"; 60].join(".")),
            ("alternating", vec!["#.a"; 40].join(".")),
            ("stars", format!("{}.#", vec!["*.#"; 30].join("."))),
        ] {
            x.bind(Binding {
                dest: Destination::Queue(queue(q)),
                key: pattern,
                args: FieldTable::default(),
            });
        }
        assert_eq!(routed(&x, &key, None), ["alternating", "hashes", "stars"]);
        assert_eq!(routed(&x, "b", None), ["hashes"]);
    }

    /// A plain matcher, for comparison: does `pattern` match `key` (words, AMQP rules)?
    fn reference_match(pattern: &[&str], key: &[&str]) -> bool {
        // can[i][j]: the first i pattern words match the first j key words.
        let mut can = vec![vec![false; key.len() + 1]; pattern.len() + 1];
        can[0][0] = true;
        for i in 1..=pattern.len() {
            for j in 0..=key.len() {
                can[i][j] = match pattern[i - 1] {
                    "#" => can[i - 1][j] || (j > 0 && can[i][j - 1]),
                    "*" => j > 0 && can[i - 1][j - 1],
                    w => j > 0 && key[j - 1] == w && can[i - 1][j - 1],
                };
            }
        }
        can[pattern.len()][key.len()]
    }

    proptest::proptest! {
        /// The trie routes exactly the bindings a plain matcher accepts, each once.
        #[test]
        fn topic_trie_agrees_with_a_plain_matcher(
            patterns in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(vec!["a", "b", "*", "#"]), 0..7),
                1..8,
            ),
            key in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "c"]), 0..8),
        ) {
            let x = exchange(ExchangeKind::Topic);
            for (i, p) in patterns.iter().enumerate() {
                x.bind(Binding {
                    dest: Destination::Queue(queue(&format!("q{i:02}"))),
                    key: p.join("."),
                    args: FieldTable::default(),
                });
            }
            let expected: Vec<String> = patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| reference_match(p, &key))
                .map(|(i, _)| format!("q{i:02}"))
                .collect();
            proptest::prop_assert_eq!(routed(&x, &key.join("."), None), expected);
        }
    }

    #[test]
    fn headers_all_any() {
        let x = exchange(ExchangeKind::Headers);
        let mut all = FieldTable::default();
        all.insert("a".into(), AMQPValue::LongString("1".into()));
        all.insert("b".into(), AMQPValue::LongInt(2));
        let mut any = all.clone();
        any.insert("x-match".into(), AMQPValue::LongString("any".into()));
        x.bind(Binding {
            dest: Destination::Queue(queue("all")),
            key: String::new(),
            args: all,
        });
        x.bind(Binding {
            dest: Destination::Queue(queue("any")),
            key: String::new(),
            args: any,
        });
        let mut h = FieldTable::default();
        h.insert("a".into(), AMQPValue::ShortString("1".into()));
        assert_eq!(routed(&x, "", Some(&h)), ["any"]);
        h.insert("b".into(), AMQPValue::ShortShortInt(2));
        assert_eq!(routed(&x, "", Some(&h)), ["all", "any"]);
    }
}
