//! The fast path of [`TransRequest::from_slice`]: the body is decoded field by field as
//! serde_json reads it, with the same tolerance as [`TransRequest::from_json`] (`null`
//! for "", numbers and booleans as strings, numeric strings as numbers, unknown keys
//! skipped, the last of a repeated key kept), but with no `serde_json::Value` tree of
//! owned keys and values built first. Any error, and any payload that is not a string or
//! `null`, makes the caller take the `Value` path, which explains errors.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::TransRequest;

pub(super) fn decode(body: &[u8]) -> Result<TransRequest, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let req = de.deserialize_map(Top)?;
    de.end()?;
    Ok(req)
}

struct Top;

impl<'de> Visitor<'de> for Top {
    type Value = TransRequest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TransRequest, A::Error> {
        let mut r = TransRequest::default();
        while let Some(Key(k)) = map.next_key()? {
            let o = &mut r.options;
            match &*k {
                "gid" => r.gid = map.next_value::<Text>()?.0,
                "trans_type" => r.trans_type = map.next_value::<Text>()?.0,
                "query_prepared" => r.query_prepared = map.next_value::<Text>()?.0,
                "protocol" => r.protocol = map.next_value::<Text>()?.0,
                "custom_data" => r.custom_data = map.next_value::<Text>()?.0,
                "rollback_reason" => r.rollback_reason = map.next_value::<Text>()?.0,
                "req_extra" => r.req_extra = map.next_value::<Texts<true>>()?.0,
                "wait_result" => o.wait_result = map.next_value::<Flag>()?.0,
                "timeout_to_fail" => o.timeout_to_fail = map.next_value::<Int>()?.0,
                "request_timeout" => o.request_timeout = map.next_value::<Int>()?.0,
                "retry_interval" => o.retry_interval = map.next_value::<Int>()?.0,
                "branch_headers" => o.branch_headers = map.next_value::<Texts<true>>()?.0,
                "concurrent" => o.concurrent = map.next_value::<Flag>()?.0,
                "retry_limit" => o.retry_limit = map.next_value::<Int>()?.0,
                "retry_count" => o.retry_count = map.next_value::<Int>()?.0,
                "steps" => r.steps = map.next_value::<Steps>()?.0,
                "payloads" => r.payloads = map.next_value::<Payloads>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(r)
    }
}

/// A key, borrowed from the body when it holds no escape.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A string field as `str_field` reads one.
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
            fn visit_unit<E: Error>(self) -> Result<Text, E> {
                Ok(Text(String::new()))
            }
            fn visit_bool<E: Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<Text, E> {
                // written as serde_json writes a parsed float, as `Value::to_string` does
                serde_json::Number::from_f64(v)
                    .map(|n| Text(n.to_string()))
                    .ok_or_else(|| E::custom("not a finite number"))
            }
        }
        d.deserialize_any(V)
    }
}

/// An integer field as `int_field` reads one.
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_unit<E: Error>(self) -> Result<Int, E> {
                Ok(Int(0))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<Int, E> {
                // beyond i64, through f64 as `int_field` does (saturating)
                Ok(Int(i64::try_from(v).unwrap_or(v as f64 as i64)))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<Int, E> {
                if v.is_finite() {
                    Ok(Int(v as i64))
                } else {
                    Err(E::custom("not a finite number"))
                }
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Int, E> {
                let t = v.trim();
                if t.is_empty() {
                    return Ok(Int(0));
                }
                t.parse().map(Int).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A boolean field as `bool_field` reads one.
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a boolean")
            }
            fn visit_unit<E: Error>(self) -> Result<Flag, E> {
                Ok(Flag(false))
            }
            fn visit_bool<E: Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Flag, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("not 0 or 1"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<Flag, E> {
                match v {
                    0 => Ok(Flag(false)),
                    1 => Ok(Flag(true)),
                    _ => Err(E::custom("not 0 or 1")),
                }
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Flag, E> {
                match v {
                    "true" | "1" => Ok(Flag(true)),
                    "false" | "0" | "" => Ok(Flag(false)),
                    _ => Err(E::custom("not a boolean")),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// An object of string fields (`str_map_field`); `NULL_IS_EMPTY` also takes `null`, as
/// a top-level field may be and a step may not.
struct Texts<const NULL_IS_EMPTY: bool>(BTreeMap<String, String>);

impl<'de, const NULL_IS_EMPTY: bool> Deserialize<'de> for Texts<NULL_IS_EMPTY> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: bool>;
        impl<'de, const N: bool> Visitor<'de> for V<N> {
            type Value = Texts<N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_unit<E: Error>(self) -> Result<Texts<N>, E> {
                if N {
                    Ok(Texts(BTreeMap::new()))
                } else {
                    Err(E::custom("null where an object is needed"))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Texts<N>, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, Text(v))) = map.next_entry::<String, Text>()? {
                    out.insert(k, v);
                }
                Ok(Texts(out))
            }
        }
        d.deserialize_any(V::<NULL_IS_EMPTY>)
    }
}

struct Steps(Vec<BTreeMap<String, String>>);

impl<'de> Deserialize<'de> for Steps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Steps;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of steps")
            }
            fn visit_unit<E: Error>(self) -> Result<Steps, E> {
                Ok(Steps(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Steps, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(Texts(step)) = seq.next_element::<Texts<false>>()? {
                    out.push(step);
                }
                Ok(Steps(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Payloads that are strings or `null`; any other JSON goes to the `Value` path, which
/// writes it out as text.
struct Payloads(Vec<Vec<u8>>);

impl<'de> Deserialize<'de> for Payloads {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Item(Vec<u8>);
        impl<'de> Deserialize<'de> for Item {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Item;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a string or null")
                    }
                    fn visit_str<E: Error>(self, v: &str) -> Result<Item, E> {
                        Ok(Item(v.as_bytes().to_vec()))
                    }
                    fn visit_string<E: Error>(self, v: String) -> Result<Item, E> {
                        Ok(Item(v.into_bytes()))
                    }
                    fn visit_unit<E: Error>(self) -> Result<Item, E> {
                        Ok(Item(Vec::new()))
                    }
                }
                d.deserialize_any(V)
            }
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Payloads;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of strings")
            }
            fn visit_unit<E: Error>(self) -> Result<Payloads, E> {
                Ok(Payloads(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Payloads, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(Item(p)) = seq.next_element()? {
                    out.push(p);
                }
                Ok(Payloads(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::super::TransRequest;
    use serde_json::{Value, json};

    /// What the `Value` path gives for `body`.
    fn slow(body: &[u8]) -> Result<TransRequest, String> {
        let v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        TransRequest::from_json(&v)
    }

    /// The fast path agrees with the `Value` path wherever it takes a body.
    fn agrees(body: &[u8]) -> bool {
        match TransRequest::from_slice(body) {
            Some(fast) => {
                assert_eq!(Ok(fast), slow(body), "{}", String::from_utf8_lossy(body));
                true
            }
            None => false,
        }
    }

    #[test]
    fn what_sdks_send_takes_the_fast_path_with_the_same_result() {
        let bodies = [
            json!({"gid": "g;1\n", "trans_type": "saga", "steps": [{"action": "http://a/TransOut", "compensate": "http://a/TransOutRevert"}, {"action": "http://a/TransIn", "compensate": "http://a/TransInRevert"}], "payloads": ["{\"amount\":30}", "{\"amount\":30}"], "wait_result": true, "custom_data": "", "branch_headers": {"X-Id": "7"}}),
            json!({"gid": "g", "trans_type": "msg", "query_prepared": "http://a/q", "steps": [{"action": "http://a/x"}], "payloads": [null], "timeout_to_fail": "5", "retry_interval": 10, "concurrent": "true", "retry_limit": 2.7, "req_extra": null}),
            json!({"gid": 12, "trans_type": "tcc", "wait_result": 1, "request_timeout": "", "protocol": null, "unknown": {"deep": [1, {"x": null}]}, "retry_count": 18446744073709551615u64}),
            json!({"gid": "w", "trans_type": "workflow", "custom_data": 1.5e300, "req_extra": {"a": null, "b": false, "c": -3}, "steps": null, "payloads": null}),
            json!({"gid": "l", "trans_type": "saga", "steps": [{"action": "a", "compensate": "c", "data": "{\"amount\":30}"}]}),
            json!({}),
        ];
        for b in &bodies {
            let text = serde_json::to_vec(b).unwrap_or_default();
            assert!(agrees(&text), "not taken: {b}");
        }
        // a repeated key: the last one counts, on both paths
        assert!(agrees(
            br#"{"gid":"a","gid":"b","wait_result":true,"wait_result":null}"#
        ));
        // escapes in keys and values
        assert!(agrees(br#"{"g\u0069d":"\u00e9\n","trans_type":"saga"}"#));
    }

    #[test]
    fn bodies_it_does_not_take_are_left_to_the_value_path() {
        for b in [
            &br#"{"steps":"x"}"#[..],
            br#"{"timeout_to_fail":"soon"}"#,
            br#"{"timeout_to_fail":-1}"#,
            br#"{"payloads":[{"amount":30}]}"#,
            br#"{"steps":[null]}"#,
            br#"{"gid":[1]}"#,
            br#"{"wait_result":2}"#,
            br#"[1]"#,
            br#"{"gid":"a"} x"#,
            br#"{"gid":"a""#,
        ] {
            assert_eq!(
                TransRequest::from_slice(b),
                None,
                "{}",
                String::from_utf8_lossy(b)
            );
        }
    }

    /// Random bodies built from the fields and value shapes dtm's clients send: wherever
    /// the fast path takes one, it gives what the `Value` path gives.
    #[test]
    fn random_bodies_agree() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let keys = [
            "gid",
            "trans_type",
            "steps",
            "payloads",
            "wait_result",
            "timeout_to_fail",
            "request_timeout",
            "retry_interval",
            "retry_limit",
            "retry_count",
            "concurrent",
            "branch_headers",
            "req_extra",
            "custom_data",
            "query_prepared",
            "protocol",
            "rollback_reason",
            "other",
        ];
        let scalars = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(1),
            json!(-7),
            json!(2.5),
            json!(1e20),
            json!(u64::MAX),
            json!(""),
            json!(" 12 "),
            json!("x"),
            json!("true"),
            json!("0"),
            json!("-3"),
        ];
        let mut taken = 0;
        for _ in 0..3000 {
            let mut obj = serde_json::Map::new();
            for _ in 0..next(6) {
                let k = keys[next(keys.len() as u64) as usize];
                let v = match next(4) {
                    0 => Value::Array(
                        (0..next(3))
                            .map(|_| match next(3) {
                                0 => json!({"action": scalars[next(15) as usize].clone(), "data": "d"}),
                                1 => scalars[next(15) as usize].clone(),
                                _ => json!("p"),
                            })
                            .collect(),
                    ),
                    1 => json!({"h": scalars[next(15) as usize].clone()}),
                    _ => scalars[next(15) as usize].clone(),
                };
                obj.insert(k.to_string(), v);
            }
            let text = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
            if agrees(&text) {
                taken += 1;
            }
        }
        assert!(
            taken > 300,
            "only {taken} of 3000 bodies took the fast path"
        );
    }
}
