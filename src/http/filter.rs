//! The list query parameters RabbitMQ's API takes and rabbitmqadmin sends: `columns`
//! (keep only these keys, dotted for nested ones), `sort` and `sort_reverse`.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// Applies `columns`, `sort` and `sort_reverse` from `query` to a list of objects.
pub fn apply(mut items: Vec<Value>, query: &HashMap<String, String>) -> Value {
    if let Some(key) = query.get("sort").filter(|k| !k.is_empty()) {
        items.sort_by(|a, b| compare(lookup(a, key), lookup(b, key)));
        if query.get("sort_reverse").is_some_and(|v| v == "true") {
            items.reverse();
        }
    }
    if let Some(columns) = query.get("columns").filter(|c| !c.is_empty()) {
        let columns: Vec<&str> = columns.split(',').collect();
        items = items.iter().map(|item| select(item, &columns)).collect();
    }
    Value::Array(items)
}

fn lookup<'a>(v: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(v, |v, part| v.get(part))
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(std::cmp::Ordering::Equal),
        (Some(x), Some(y)) => x.to_string().cmp(&y.to_string()),
        (a, b) => a.is_some().cmp(&b.is_some()),
    }
}

/// Keeps only `columns` of `item`, nesting dotted ones as RabbitMQ does.
fn select(item: &Value, columns: &[&str]) -> Value {
    let mut out = Map::new();
    for column in columns {
        if let Some(value) = lookup(item, column) {
            let parts: Vec<&str> = column.split('.').collect();
            insert_path(&mut out, &parts, value.clone());
        }
    }
    Value::Object(out)
}

fn insert_path(map: &mut Map<String, Value>, parts: &[&str], value: Value) {
    match parts {
        [] => {}
        [last] => {
            map.insert(last.to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = map
                .entry(first.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_keep_nested_keys_and_sort_orders() {
        let items = vec![
            json!({"name": "b", "messages": 2, "message_stats": {"publish": 5, "ack": 1}}),
            json!({"name": "a", "messages": 10, "message_stats": {"publish": 7}}),
        ];
        let q: HashMap<String, String> = [
            ("columns", "name,message_stats.publish"),
            ("sort", "messages"),
            ("sort_reverse", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            apply(items, &q),
            json!([
                {"name": "a", "message_stats": {"publish": 7}},
                {"name": "b", "message_stats": {"publish": 5}},
            ])
        );
    }
}
