//! Sender-selected distribution, as RabbitMQ: the `CC` and `BCC` headers of a publish
//! (arrays of long strings) add routing keys to the one of basic.publish, for every
//! exchange type that routes by key. `BCC` is removed from the message before any
//! queue sees it; `CC` stays. A `CC` or `BCC` that is not an array makes the publish a
//! 406; array elements that are not long strings are ignored.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable};

use super::field_type;
use crate::protocol::{AmqpError, reply::amqp_err};

const CC: &str = "CC";
const BCC: &str = "BCC";

/// The routing keys a publish adds with CC and BCC, and its properties without BCC
/// (None when they need no change). Costs nothing for a publish without headers.
pub fn extra_routing_keys(
    properties: &BasicProperties,
) -> Result<(Vec<String>, Option<BasicProperties>), AmqpError> {
    let Some(headers) = properties.headers() else {
        return Ok((Vec::new(), None));
    };
    let (cc, bcc) = (headers.inner().get(CC), headers.inner().get(BCC));
    if cc.is_none() && bcc.is_none() {
        return Ok((Vec::new(), None));
    }
    let mut keys = Vec::new();
    for (name, value) in [(CC, cc), (BCC, bcc)] {
        match value {
            None => {}
            Some(AMQPValue::FieldArray(items)) => {
                keys.extend(items.as_slice().iter().filter_map(|v| match v {
                    AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into()),
                    _ => None,
                }));
            }
            Some(other) => {
                return Err(amqp_err!(
                    PreconditionFailed,
                    "invalid message: {{unacceptable_type_in_header,\"{}\",{}}}",
                    name,
                    field_type::rabbit_name(other)
                ));
            }
        }
    }
    let stripped = bcc.is_some().then(|| {
        let mut kept = FieldTable::default();
        for (k, v) in headers.inner() {
            if k.as_str() != BCC {
                kept.insert(k.clone(), v.clone());
            }
        }
        properties.clone().with_headers(kept)
    });
    Ok((keys, stripped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::FieldArray;

    fn with_headers(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut h = FieldTable::default();
        for (k, v) in pairs {
            h.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn no_headers_no_keys() {
        let (keys, props) = extra_routing_keys(&BasicProperties::default()).unwrap();
        assert!(keys.is_empty() && props.is_none());
    }

    #[test]
    fn cc_and_bcc_add_keys_and_bcc_is_stripped() {
        let arr = |xs: &[&str]| {
            AMQPValue::FieldArray(FieldArray::from(
                xs.iter()
                    .map(|x| AMQPValue::LongString((*x).into()))
                    .chain([AMQPValue::LongInt(1)])
                    .collect::<Vec<_>>(),
            ))
        };
        let p = with_headers(&[("CC", arr(&["a", "b"])), ("BCC", arr(&["c"]))]);
        let (keys, props) = extra_routing_keys(&p).unwrap();
        assert_eq!(keys, ["a", "b", "c"]);
        let h = props.unwrap().headers().clone().unwrap();
        assert!(h.inner().contains_key("CC") && !h.inner().contains_key("BCC"));
    }

    #[test]
    fn a_cc_that_is_not_an_array_is_refused() {
        let p = with_headers(&[("CC", AMQPValue::LongString("a".into()))]);
        let e = extra_routing_keys(&p).unwrap_err();
        assert_eq!(e.code.code(), 406);
    }
}
