//! The management API as `warren ctl` uses it: blocking HTTP with basic auth (ureq),
//! JSON in and out, API errors turned into messages for the operator.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

/// A node's management API.
pub struct Api {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

/// Percent-encodes one path segment (a vhost "/" becomes "%2F").
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

impl Api {
    /// An API at `base` (e.g. `http://127.0.0.1:15672`) as `user`.
    pub fn new(base: &str, user: &str, password: &str) -> Api {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build();
        Api {
            agent: ureq::Agent::new_with_config(config),
            base: base.trim_end_matches('/').to_string(),
            auth: format!("Basic {}", BASE64.encode(format!("{user}:{password}"))),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api{path}", self.base)
    }

    fn finish(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        path: &str,
    ) -> Result<Value, String> {
        let mut response = result.map_err(|e| format!("cannot reach {}: {e}", self.base))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("reading the answer to {path}: {e}"))?;
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status >= 400 {
            let reason = json["reason"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| json.to_string());
            return Err(match status {
                404 => format!("not found: {path}"),
                _ => format!("{reason} ({status})"),
            });
        }
        Ok(json)
    }

    /// GET.
    pub fn get(&self, path: &str) -> Result<Value, String> {
        let r = self
            .agent
            .get(self.url(path))
            .header("Authorization", &self.auth)
            .call();
        self.finish(r, path)
    }

    /// PUT with a JSON body.
    pub fn put(&self, path: &str, body: &Value) -> Result<Value, String> {
        let r = self
            .agent
            .put(self.url(path))
            .header("Authorization", &self.auth)
            .send_json(body);
        self.finish(r, path)
    }

    /// POST with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        let r = self
            .agent
            .post(self.url(path))
            .header("Authorization", &self.auth)
            .send_json(body);
        self.finish(r, path)
    }

    /// DELETE with a JSON body (as RabbitMQ's replica removal takes its node).
    pub fn delete_json(&self, path: &str, body: &Value) -> Result<Value, String> {
        let r = self
            .agent
            .delete(self.url(path))
            .header("Authorization", &self.auth)
            .force_send_body()
            .send_json(body);
        self.finish(r, path)
    }

    /// DELETE, with extra headers.
    pub fn delete(&self, path: &str, headers: &[(&str, &str)]) -> Result<Value, String> {
        let mut req = self
            .agent
            .delete(self.url(path))
            .header("Authorization", &self.auth);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.call();
        self.finish(r, path)
    }
}
