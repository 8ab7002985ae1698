//! Stored records, serialised as dtm's `TransGlobalStore` / `TransBranchStore`.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// Per-transaction options, stored as JSON in the `options` column exactly as dtm writes
/// them: every key omitted when empty except `concurrent`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransOptions {
    #[serde(skip_serializing_if = "is_false")]
    pub wait_result: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub timeout_to_fail: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub request_timeout: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub retry_interval: i64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub branch_headers: BTreeMap<String, String>,
    pub concurrent: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub retry_limit: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub retry_count: i64,
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl TransOptions {
    /// The JSON stored in the `options` column.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{\"concurrent\":false}".to_string())
    }

    /// Decode the `options` column; an empty or unreadable value gives the defaults.
    pub fn from_json(s: &str) -> TransOptions {
        if s.is_empty() {
            return TransOptions::default();
        }
        serde_json::from_str(s).unwrap_or_default()
    }
}

/// A global transaction as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransGlobal {
    pub id: i64,
    pub gid: String,
    pub trans_type: String,
    pub status: String,
    pub query_prepared: String,
    pub protocol: String,
    pub create_time: Option<DateTime<Utc>>,
    pub update_time: Option<DateTime<Utc>>,
    pub finish_time: Option<DateTime<Utc>>,
    pub rollback_time: Option<DateTime<Utc>>,
    pub options: String,
    pub custom_data: String,
    pub next_cron_interval: i64,
    pub next_cron_time: Option<DateTime<Utc>>,
    pub owner: String,
    pub ext_data: String,
    pub result: String,
    pub rollback_reason: String,
}

impl TransGlobal {
    pub fn trans_options(&self) -> TransOptions {
        TransOptions::from_json(&self.options)
    }

    /// Headers that old dtm clients passed through (`passthrough_headers`) and old dtm
    /// servers kept in `ext_data` as `{"headers":{..}}`; dtm still sends them to the
    /// branches of such rows. Empty when there are none or `ext_data` is not that shape.
    pub fn passthrough_headers(&self) -> BTreeMap<String, String> {
        if self.ext_data.is_empty() {
            return BTreeMap::new();
        }
        serde_json::from_str::<serde_json::Value>(&self.ext_data)
            .ok()
            .and_then(|v| {
                v.get("headers").and_then(|h| h.as_object()).map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    pub fn is_finished(&self) -> bool {
        crate::status::is_final(&self.status)
    }
}

/// One (branch, op) row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Branch {
    pub id: i64,
    pub gid: String,
    pub url: String,
    pub bin_data: Vec<u8>,
    pub branch_id: String,
    pub op: String,
    pub status: String,
    pub create_time: Option<DateTime<Utc>>,
    pub update_time: Option<DateTime<Utc>>,
    pub finish_time: Option<DateTime<Utc>>,
    pub rollback_time: Option<DateTime<Utc>>,
}

/// dtm writes times as RFC 3339 with sub-second digits when present (in groups of 3, as
/// chrono's `SecondsFormat::AutoSi` with `Z`). Written by hand for the common case, years
/// 0 to 9999 and no leap second: chrono's formatter goes through `fmt::Write` and was
/// ~700 instructions per time, 14 times per `query` answer.
pub fn format_time(t: &DateTime<Utc>) -> String {
    let (year, nanos) = (t.year(), t.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    }
    let mut b = [0u8; 30];
    let mut n = 0;
    let mut put = |v: u32, width: u32| {
        let mut d = 10u32.pow(width - 1);
        while d > 0 {
            b[n] = b'0' + ((v / d) % 10) as u8;
            n += 1;
            d /= 10;
        }
    };
    put(year as u32, 4);
    put(t.month(), 2);
    put(t.day(), 2);
    put(t.hour(), 2);
    put(t.minute(), 2);
    put(t.second(), 2);
    let (frac, width) = if nanos == 0 {
        (0, 0)
    } else if nanos % 1_000_000 == 0 {
        (nanos / 1_000_000, 3)
    } else if nanos % 1_000 == 0 {
        (nanos / 1_000, 6)
    } else {
        (nanos, 9)
    };
    if width > 0 {
        put(frac, width);
    }
    let digits = &b[..n];
    let mut out = String::with_capacity(n + 7);
    for (i, d) in digits.iter().enumerate() {
        match i {
            4 | 6 => out.push('-'),
            8 => out.push('T'),
            10 | 12 => out.push(':'),
            14 => out.push('.'),
            _ => {}
        }
        out.push(*d as char);
    }
    out.push('Z');
    out
}

struct Time<'a>(&'a Option<DateTime<Utc>>);

impl Serialize for Time<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(t) => s.serialize_str(&format_time(t)),
            None => s.serialize_none(),
        }
    }
}

impl Serialize for TransGlobal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("create_time", &Time(&self.create_time))?;
        m.serialize_entry("update_time", &Time(&self.update_time))?;
        let strs = [
            ("gid", &self.gid),
            ("trans_type", &self.trans_type),
            ("status", &self.status),
            ("query_prepared", &self.query_prepared),
            ("protocol", &self.protocol),
        ];
        for (k, v) in strs {
            if !v.is_empty() {
                m.serialize_entry(k, v)?;
            }
        }
        if self.finish_time.is_some() {
            m.serialize_entry("finish_time", &Time(&self.finish_time))?;
        }
        if self.rollback_time.is_some() {
            m.serialize_entry("rollback_time", &Time(&self.rollback_time))?;
        }
        let strs = [
            ("result", &self.result),
            ("rollback_reason", &self.rollback_reason),
            ("options", &self.options),
            ("custom_data", &self.custom_data),
        ];
        for (k, v) in strs {
            if !v.is_empty() {
                m.serialize_entry(k, v)?;
            }
        }
        if self.next_cron_interval != 0 {
            m.serialize_entry("next_cron_interval", &self.next_cron_interval)?;
        }
        if self.next_cron_time.is_some() {
            m.serialize_entry("next_cron_time", &Time(&self.next_cron_time))?;
        }
        if !self.owner.is_empty() {
            m.serialize_entry("owner", &self.owner)?;
        }
        if !self.ext_data.is_empty() {
            m.serialize_entry("ext_data", &self.ext_data)?;
        }
        // dtm embeds the options inline as well; `concurrent` is always present.
        let o = self.trans_options();
        if o.wait_result {
            m.serialize_entry("wait_result", &true)?;
        }
        for (k, v) in [
            ("timeout_to_fail", o.timeout_to_fail),
            ("request_timeout", o.request_timeout),
            ("retry_interval", o.retry_interval),
        ] {
            if v != 0 {
                m.serialize_entry(k, &v)?;
            }
        }
        if !o.branch_headers.is_empty() {
            m.serialize_entry("branch_headers", &o.branch_headers)?;
        }
        m.serialize_entry("concurrent", &o.concurrent)?;
        if o.retry_limit != 0 {
            m.serialize_entry("retry_limit", &o.retry_limit)?;
        }
        m.end()
    }
}

impl Serialize for Branch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("create_time", &Time(&self.create_time))?;
        m.serialize_entry("update_time", &Time(&self.update_time))?;
        m.serialize_entry("gid", &self.gid)?;
        m.serialize_entry("url", &self.url)?;
        if !self.bin_data.is_empty() {
            m.serialize_entry("bin_data", &crate::base64_encode(&self.bin_data))?;
        }
        m.serialize_entry("branch_id", &self.branch_id)?;
        m.serialize_entry("op", &self.op)?;
        m.serialize_entry("status", &self.status)?;
        if self.finish_time.is_some() {
            m.serialize_entry("finish_time", &Time(&self.finish_time))?;
        }
        if self.rollback_time.is_some() {
            m.serialize_entry("rollback_time", &Time(&self.rollback_time))?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_json_matches_dtm() {
        assert_eq!(TransOptions::default().to_json(), r#"{"concurrent":false}"#);
        let o = TransOptions {
            wait_result: true,
            timeout_to_fail: 3,
            ..Default::default()
        };
        assert_eq!(
            o.to_json(),
            r#"{"wait_result":true,"timeout_to_fail":3,"concurrent":false}"#
        );
        assert_eq!(TransOptions::from_json(&o.to_json()), o);
    }

    #[test]
    fn global_json_omits_empty_fields() {
        let g = TransGlobal {
            gid: "g1".into(),
            trans_type: "saga".into(),
            status: "submitted".into(),
            options: TransOptions::default().to_json(),
            ..Default::default()
        };
        let v = serde_json::to_value(&g).unwrap_or_default();
        assert_eq!(v["gid"], "g1");
        assert_eq!(v["concurrent"], false);
        assert!(v.get("rollback_reason").is_none());
        assert!(v["create_time"].is_null());
    }

    #[test]
    fn format_time_matches_chrono_auto_si() {
        use chrono::TimeZone;
        let secs = [
            0i64,
            1,
            59,
            951_782_400,     // 2000-02-29
            1_700_000_000,   // 2023
            4_102_444_799,   // 2099-12-31T23:59:59
            253_402_300_799, // 9999-12-31T23:59:59
            -62_135_596_800, // 0001-01-01
        ];
        let nanos = [
            0u32,
            1,
            999,
            1_000,
            123_000,
            1_000_000,
            5_000_000,
            999_000_000,
            123_456_789,
            999_999_999,
        ];
        for s in secs {
            for n in nanos {
                let t = Utc.timestamp_opt(s, n).single().unwrap();
                assert_eq!(
                    format_time(&t),
                    t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                    "{s} {n}"
                );
            }
        }
        // Outside 0..=9999 the chrono form is used.
        let far = Utc.timestamp_opt(300_000_000_000, 0).single().unwrap();
        assert_eq!(
            format_time(&far),
            far.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        );
    }
}
