//! Tolerant decoding of the request bodies dtm's clients send: `null` where a string is
//! expected, numbers as strings, unknown keys, legacy saga `steps[i].data`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::TransOptions;

mod fast;

/// The body of prepare, submit, abort, forceStop, resetNextCronTime and prepareWorkflow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransRequest {
    pub gid: String,
    pub trans_type: String,
    pub steps: Vec<BTreeMap<String, String>>,
    /// One body per step. Legacy `steps[i].data` payloads are appended after `payloads`.
    pub payloads: Vec<Vec<u8>>,
    pub query_prepared: String,
    pub protocol: String,
    pub custom_data: String,
    pub rollback_reason: String,
    pub options: TransOptions,
    pub req_extra: BTreeMap<String, String>,
}

/// Why a request body could not be used.
pub type DecodeError = String;

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A string field: missing and `null` give "", numbers and booleans are written out.
pub fn str_field(obj: &Map<String, Value>, key: &str) -> Result<String, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(v) => Err(format!(
            "field '{key}' must be a string, got {}",
            type_name(v)
        )),
    }
}

/// An integer field: missing and `null` give 0; numeric strings are accepted.
pub fn int_field(obj: &Map<String, Value>, key: &str) -> Result<i64, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .ok_or_else(|| format!("field '{key}' must be an integer, got {n}")),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(0),
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("field '{key}' must be an integer, got \"{s}\"")),
        Some(v) => Err(format!(
            "field '{key}' must be an integer, got {}",
            type_name(v)
        )),
    }
}

/// A boolean field: missing and `null` give false; "true"/"false" and 0/1 are accepted.
pub fn bool_field(obj: &Map<String, Value>, key: &str) -> Result<bool, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::Number(n)) if n.as_i64() == Some(0) => Ok(false),
        Some(Value::Number(n)) if n.as_i64() == Some(1) => Ok(true),
        Some(Value::String(s)) if s == "true" || s == "1" => Ok(true),
        Some(Value::String(s)) if s == "false" || s == "0" || s.is_empty() => Ok(false),
        Some(v) => Err(format!("field '{key}' must be a boolean, got {v}")),
    }
}

/// A string-to-string map: missing and `null` give an empty map; `null` values are "".
pub fn str_map_field(
    obj: &Map<String, Value>,
    key: &str,
) -> Result<BTreeMap<String, String>, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => {
            let mut out = BTreeMap::new();
            for k in m.keys() {
                let v = str_field(m, k).map_err(|e| format!("in '{key}': {e}"))?;
                out.insert(k.clone(), v);
            }
            Ok(out)
        }
        Some(v) => Err(format!(
            "field '{key}' must be an object of strings, got {}",
            type_name(v)
        )),
    }
}

impl TransRequest {
    /// Decode a JSON body. Only shapes that cannot be read are errors; semantic checks
    /// (gid present, known trans_type, ...) belong to the service.
    pub fn from_json(body: &Value) -> Result<TransRequest, DecodeError> {
        let obj = body.as_object().ok_or_else(|| {
            format!(
                "request body must be a JSON object, got {}",
                type_name(body)
            )
        })?;
        let mut req = TransRequest {
            gid: crate::escape(&str_field(obj, "gid")?),
            trans_type: str_field(obj, "trans_type")?,
            query_prepared: str_field(obj, "query_prepared")?,
            protocol: str_field(obj, "protocol")?,
            custom_data: str_field(obj, "custom_data")?,
            rollback_reason: str_field(obj, "rollback_reason")?,
            req_extra: str_map_field(obj, "req_extra")?,
            ..Default::default()
        };
        req.default_protocol();
        req.options = TransOptions {
            wait_result: bool_field(obj, "wait_result")?,
            timeout_to_fail: int_field(obj, "timeout_to_fail")?,
            request_timeout: int_field(obj, "request_timeout")?,
            retry_interval: int_field(obj, "retry_interval")?,
            branch_headers: str_map_field(obj, "branch_headers")?,
            concurrent: bool_field(obj, "concurrent")?,
            retry_limit: int_field(obj, "retry_limit")?,
            retry_count: int_field(obj, "retry_count")?,
        };
        req.check_options()?;
        match obj.get("steps") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let m = item.as_object().ok_or_else(|| {
                        format!("steps[{i}] must be an object, got {}", type_name(item))
                    })?;
                    let mut step = BTreeMap::new();
                    for k in m.keys() {
                        let v = str_field(m, k).map_err(|e| format!("in steps[{i}]: {e}"))?;
                        step.insert(k.clone(), v);
                    }
                    req.steps.push(step);
                }
            }
            Some(v) => {
                return Err(format!(
                    "field 'steps' must be an array, got {}",
                    type_name(v)
                ));
            }
        }
        match obj.get("payloads") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::Null => req.payloads.push(Vec::new()),
                        Value::String(s) => req.payloads.push(s.clone().into_bytes()),
                        // some clients send the payload object itself
                        v @ (Value::Object(_)
                        | Value::Array(_)
                        | Value::Number(_)
                        | Value::Bool(_)) => req.payloads.push(v.to_string().into_bytes()),
                    }
                    let _ = i;
                }
            }
            Some(v) => {
                return Err(format!(
                    "field 'payloads' must be an array of strings, got {}",
                    type_name(v)
                ));
            }
        }
        req.append_legacy_payloads();
        Ok(req)
    }

    /// Decode a JSON body straight from its bytes, without building a `serde_json::Value`
    /// first. `None` for a body this fast path does not take (any error, and payloads
    /// that are not strings): [`TransRequest::from_json`] then decodes it, or explains
    /// what is wrong, so both give the same result for every body.
    pub fn from_slice(body: &[u8]) -> Option<TransRequest> {
        let mut req = fast::decode(body).ok()?;
        req.gid = crate::escape(&req.gid);
        req.default_protocol();
        req.check_options().ok()?;
        req.append_legacy_payloads();
        Some(req)
    }

    fn default_protocol(&mut self) {
        if self.protocol.is_empty() {
            self.protocol = crate::protocol::HTTP.to_string();
        }
    }

    fn check_options(&self) -> Result<(), DecodeError> {
        let o = &self.options;
        for (k, v) in [
            ("timeout_to_fail", o.timeout_to_fail),
            ("request_timeout", o.request_timeout),
            ("retry_interval", o.retry_interval),
            ("retry_limit", o.retry_limit),
        ] {
            if v < 0 {
                return Err(format!("field '{k}' must not be negative, got {v}"));
            }
        }
        Ok(())
    }

    /// Legacy: payloads inside steps[i].data are appended after `payloads`.
    fn append_legacy_payloads(&mut self) {
        for step in &self.steps {
            if let Some(d) = step.get("data") {
                self.payloads.push(d.clone().into_bytes());
            }
        }
    }
}

/// The flat string map of registerBranch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegisterBranchRequest {
    pub fields: BTreeMap<String, String>,
    /// The branch body as bytes (gRPC `BusiPayload`); when `None` the `data` field's text
    /// is the body.
    pub bin_data: Option<Vec<u8>>,
}

impl RegisterBranchRequest {
    pub fn from_json(body: &Value) -> Result<RegisterBranchRequest, DecodeError> {
        let obj = body.as_object().ok_or_else(|| {
            format!(
                "registerBranch body must be a JSON object of strings, got {}",
                type_name(body)
            )
        })?;
        let mut fields = BTreeMap::new();
        for (k, v) in obj {
            let s = match v {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "registerBranch field '{k}' must be a string, got {}",
                        type_name(other)
                    ));
                }
            };
            fields.insert(k.clone(), s);
        }
        if let Some(g) = fields.get_mut("gid") {
            *g = crate::escape(g);
        }
        Ok(RegisterBranchRequest {
            fields,
            bin_data: None,
        })
    }

    pub fn get(&self, k: &str) -> &str {
        self.fields.get(k).map(String::as_str).unwrap_or("")
    }

    /// The branch body: `bin_data` when given, else the bytes of the `data` field.
    pub fn body(&self) -> Vec<u8> {
        match &self.bin_data {
            Some(b) => b.clone(),
            None => self.get("data").as_bytes().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tolerant_decoding() {
        let v = json!({
            "gid": "g;1", "trans_type": "saga", "query_prepared": null,
            "steps": [{"action": "http://a", "compensate": null}],
            "payloads": ["{}"], "timeout_to_fail": "5", "wait_result": true,
            "unknown": {"x": 1}
        });
        let r = TransRequest::from_json(&v).unwrap_or_default();
        assert_eq!(r.gid, "g1");
        assert_eq!(r.protocol, "http");
        assert_eq!(r.steps[0]["compensate"], "");
        assert_eq!(r.options.timeout_to_fail, 5);
        assert!(r.options.wait_result);
        assert_eq!(r.payloads, vec![b"{}".to_vec()]);
    }

    #[test]
    fn legacy_step_data_is_a_payload() {
        let v = json!({"gid": "g", "trans_type": "saga",
            "steps": [{"action": "a", "compensate": "c", "data": "{\"amount\":30}"}]});
        let r = TransRequest::from_json(&v).unwrap_or_default();
        assert_eq!(r.payloads, vec![b"{\"amount\":30}".to_vec()]);
    }

    #[test]
    fn bad_shapes_are_explained() {
        let e = TransRequest::from_json(&json!({"steps": "x"})).unwrap_err();
        assert!(e.contains("steps"), "{e}");
        let e = TransRequest::from_json(&json!({"timeout_to_fail": "soon"})).unwrap_err();
        assert!(e.contains("timeout_to_fail"), "{e}");
        let e = TransRequest::from_json(&json!([1])).unwrap_err();
        assert!(e.contains("object"), "{e}");
        let e = RegisterBranchRequest::from_json(&json!({"gid": {"a": 1}})).unwrap_err();
        assert!(e.contains("gid"), "{e}");
    }
}
