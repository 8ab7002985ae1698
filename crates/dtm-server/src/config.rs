//! Configuration with dtm's YAML keys and environment names.
//!
//! Order, as in dtm: defaults, then environment variables, then the YAML file given with
//! `-c` on top. Every key has one environment name derived from its YAML path the way dtm
//! derives it (`Store.Driver` -> `STORE_DRIVER`, `MicroService.EndPoint` ->
//! `MICRO_SERVICE_END_POINT`). Unknown YAML keys are warned about; a value of the wrong
//! type is an error that names the key, its source and what is expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Str,
}

struct Key {
    path: &'static str,
    kind: Kind,
    default: &'static str,
}

const fn int(path: &'static str, default: &'static str) -> Key {
    Key {
        path,
        kind: Kind::Int,
        default,
    }
}
const fn text(path: &'static str, default: &'static str) -> Key {
    Key {
        path,
        kind: Kind::Str,
        default,
    }
}

/// Every key dtm knows, plus dtm-rs's own (marked).
const KEYS: &[Key] = &[
    text("Store.Driver", "sqlite"),
    text("Store.Host", ""),
    int("Store.Port", "0"),
    text("Store.User", ""),
    text("Store.Password", ""),
    text("Store.Db", "dtm"),
    text("Store.Schema", "public"),
    int("Store.MaxOpenConns", "500"),
    int("Store.MaxIdleConns", "500"),
    int("Store.ConnMaxLifeTime", "5"),
    int("Store.DataExpire", "604800"),
    int("Store.FinishedDataExpire", "86400"),
    // dtm's default is {a}, a hash tag that pins every key to one Redis Cluster slot
    text("Store.RedisPrefix", "dtm:"),
    // dtm-rs: Redis shards (hash tags) that transactions are spread over
    int("Store.RedisShards", "16"),
    // dtm-rs: file of the embedded store, and its durability (full | normal)
    text("Store.File", "dtm.sqlite"),
    text("Store.Synchronous", "full"),
    int("TransCronInterval", "3"),
    int("TimeoutToFail", "35"),
    int("RetryInterval", "10"),
    // dtm-rs: cap of the exponential retry backoff, seconds
    int("RetryMaxInterval", "3600"),
    int("RequestTimeout", "3"),
    int("HttpPort", "36789"),
    int("GrpcPort", "36790"),
    int("JsonRpcPort", "36791"),
    // dtm-rs: address to listen on, and the largest accepted request body in bytes
    text("ListenHost", "0.0.0.0"),
    int("HttpMaxBodyBytes", "4194304"),
    // dtm-rs: recovery claims this many due transactions at once, and runs this many at once
    int("RecoveryBatch", "100"),
    int("RecoveryConcurrency", "64"),
    text("MicroService.Driver", "default"),
    text("MicroService.Target", ""),
    text("MicroService.EndPoint", ""),
    text("HttpMicroService.Driver", "default"),
    text("HttpMicroService.RegistryType", ""),
    text("HttpMicroService.RegistryAddress", ""),
    text("HttpMicroService.RegistryOptions", "{}"),
    text("HttpMicroService.Target", ""),
    text("HttpMicroService.EndPoint", ""),
    int("UpdateBranchSync", "1"),
    int("UpdateBranchAsyncGoroutineNum", "1"),
    text("LogLevel", "info"),
    text("Log.Outputs", "stderr"),
    int("Log.RotationEnable", "0"),
    text("Log.RotationConfigJSON", "{}"),
    text("TimeZoneOffset", ""),
    int("ConfigUpdateInterval", "3"),
    int("AlertRetryLimit", "3"),
    text("AlertWebHook", ""),
    text("AdminBasePath", ""),
    text(
        "GrpcServiceConfig",
        r#"{"loadBalancingConfig": [{"round_robin":{}}]}"#,
    ),
];

/// dtm's environment name of a YAML key path.
pub fn env_name(path: &str) -> String {
    let joined = path.replace('.', "_");
    let chars: Vec<char> = joined.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        out.push(c);
        let next = chars.get(i + 1).copied();
        let after = chars.get(i + 2).copied();
        if let Some(n) = next {
            let lower_then_upper = c.is_ascii_lowercase() && n.is_ascii_uppercase();
            let upper_then_word = c.is_ascii_uppercase()
                && n.is_ascii_uppercase()
                && after.is_some_and(|a| a.is_ascii_lowercase());
            if lower_then_upper || upper_then_word {
                out.push('_');
            }
        }
    }
    out.to_ascii_uppercase()
}

#[derive(Debug, Clone)]
pub struct Config {
    values: BTreeMap<&'static str, String>,
    /// Things worth a warning at start (unknown keys, unused keys).
    pub warnings: Vec<String>,
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

impl Config {
    /// Defaults only.
    pub fn defaults() -> Config {
        Config {
            values: KEYS
                .iter()
                .map(|k| (k.path, k.default.to_string()))
                .collect(),
            warnings: vec![],
        }
    }

    /// Load defaults, then `env`, then the YAML file, and validate.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let mut c = Config::defaults();
        let mut source: BTreeMap<&'static str, String> = BTreeMap::new();
        for k in KEYS {
            let name = env_name(k.path);
            if let Some(v) = env(&name).filter(|v| !v.is_empty()) {
                c.values.insert(k.path, v);
                source.insert(k.path, format!("environment variable {name}"));
            }
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            let doc: serde_json::Value = if text.trim().is_empty() {
                serde_json::Value::Null
            } else {
                serde_saphyr::from_str(&text)
                    .map_err(|e| format!("config file {} is not valid YAML: {e}", path.display()))?
            };
            let mut flat = Vec::new();
            if !doc.is_null() {
                if !doc.is_object() {
                    return Err(format!(
                        "config file {} must be a YAML mapping of keys such as Store: / RetryInterval:",
                        path.display()
                    ));
                }
                flatten("", &doc, &mut flat);
            }
            for (k, v) in flat {
                let Some(key) = KEYS.iter().find(|d| d.path.eq_ignore_ascii_case(&k)) else {
                    c.warnings.push(format!(
                        "config file {}: unknown key '{k}' is ignored",
                        path.display()
                    ));
                    continue;
                };
                let s = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Null => continue,
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => if b { "1" } else { "0" }.to_string(),
                    other => {
                        return Err(format!(
                            "config file {}: key '{}' must be a single value, got {other}",
                            path.display(),
                            key.path
                        ));
                    }
                };
                c.values.insert(key.path, s);
                source.insert(
                    key.path,
                    format!("config file {} key {}", path.display(), key.path),
                );
            }
        }
        for k in KEYS {
            if k.kind == Kind::Int {
                let v = c.str(k.path);
                if v.trim().parse::<i64>().is_err() {
                    let from = source
                        .get(k.path)
                        .cloned()
                        .unwrap_or_else(|| "default".to_string());
                    return Err(format!(
                        "{} ({}) must be an integer, got '{v}' from {from}",
                        k.path,
                        env_name(k.path)
                    ));
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    fn validate(&mut self) -> Result<(), String> {
        let pos = |c: &Config, k: &str| -> Result<(), String> {
            if c.int(k) < 1 {
                return Err(format!(
                    "{k} ({}) must be at least 1, got {}",
                    env_name(k),
                    c.int(k)
                ));
            }
            Ok(())
        };
        for k in [
            "RetryInterval",
            "TimeoutToFail",
            "RequestTimeout",
            "TransCronInterval",
            "RetryMaxInterval",
            "HttpMaxBodyBytes",
            "RecoveryBatch",
            "RecoveryConcurrency",
        ] {
            pos(self, k)?;
        }
        if self.int("TimeoutToFail") < self.int("RetryInterval") {
            return Err(format!(
                "TimeoutToFail ({}) must not be smaller than RetryInterval ({})",
                self.int("TimeoutToFail"),
                self.int("RetryInterval")
            ));
        }
        for k in ["HttpPort", "GrpcPort"] {
            let p = self.int(k);
            if !(0..=65535).contains(&p) {
                return Err(format!(
                    "{k} ({}) must be a port 0-65535, got {p}",
                    env_name(k)
                ));
            }
        }
        let level = self.str("LogLevel").to_ascii_lowercase();
        if !["debug", "info", "warn", "error", "fatal", "panic"].contains(&level.as_str()) {
            return Err(format!(
                "LogLevel (LOG_LEVEL) must be debug, info, warn or error, got '{}'",
                self.str("LogLevel")
            ));
        }
        let sync = self.str("Store.Synchronous").to_ascii_lowercase();
        if sync != "full" && sync != "normal" {
            return Err(format!(
                "Store.Synchronous (STORE_SYNCHRONOUS) must be full or normal, got '{sync}'"
            ));
        }
        match self.driver() {
            "sqlite" => {}
            "mysql" | "postgres" => self.validate_sql()?,
            "redis" => {
                let warnings = crate::redis_config::validate(self)?;
                self.warnings.extend(warnings);
            }
            other => {
                return Err(format!(
                    "Store.Driver (STORE_DRIVER) '{other}' is unknown: use sqlite (alias boltdb), postgres, mysql or redis"
                ));
            }
        }
        if self.str("MicroService.Driver") != "default" {
            self.warnings.push(format!(
                "MicroService.Driver '{}' is not supported; URLs are called directly",
                self.str("MicroService.Driver")
            ));
        }
        if self.int("Log.RotationEnable") != 0 {
            self.warnings
                .push("Log.RotationEnable is not supported; logs are not rotated".into());
        }
        Ok(())
    }

    /// What the SQL drivers need, checked as dtm checks it (host, port, user, schema).
    fn validate_sql(&self) -> Result<(), String> {
        let driver = self.driver().to_string();
        for (k, what) in [
            ("Store.Host", "the database host"),
            ("Store.User", "the database user"),
            ("Store.Db", "the database name"),
        ] {
            if self.str(k).trim().is_empty() {
                return Err(format!(
                    "{k} ({}) is required for the {driver} store: set it to {what}",
                    env_name(k)
                ));
            }
        }
        if driver == "postgres" && self.str("Store.Schema").trim().is_empty() {
            return Err(
                "Store.Schema (STORE_SCHEMA) is required for the postgres store: set it to the schema of dtm's tables, e.g. public"
                    .into(),
            );
        }
        let port = self.int("Store.Port");
        if !(1..=65535).contains(&port) {
            return Err(format!(
                "Store.Port (STORE_PORT) must be the {driver} server's port (1-65535, usually {}), got {port}",
                if driver == "postgres" { 5432 } else { 3306 }
            ));
        }
        if self.int("Store.MaxOpenConns") < 1 {
            return Err(format!(
                "Store.MaxOpenConns (STORE_MAX_OPEN_CONNS) must be at least 1, got {}",
                self.int("Store.MaxOpenConns")
            ));
        }
        self.sql_options()?.check()
    }

    /// Connection settings of the postgres / mysql store.
    pub fn sql_options(&self) -> Result<dtm_store::SqlOptions, String> {
        let dialect = match self.driver() {
            "postgres" => dtm_store::sql::Dialect::Postgres,
            "mysql" => dtm_store::sql::Dialect::MySql,
            other => return Err(format!("Store.Driver '{other}' is not a SQL driver")),
        };
        let offset = self.str("TimeZoneOffset").trim();
        let utc_offset_hours = if offset.is_empty() {
            None
        } else {
            Some(offset.parse::<i32>().map_err(|_| {
                format!("TimeZoneOffset (TIME_ZONE_OFFSET) must be whole hours such as 8 or -5, got '{offset}'")
            })?)
        };
        let minutes = self.int("Store.ConnMaxLifeTime");
        let mut o = dtm_store::SqlOptions::new(dialect);
        o.host = self.str("Store.Host").trim().to_string();
        o.port = u16::try_from(self.int("Store.Port")).unwrap_or(0);
        o.user = self.str("Store.User").to_string();
        o.password = self.str("Store.Password").to_string();
        o.db = self.str("Store.Db").to_string();
        o.schema = self.str("Store.Schema").trim().to_string();
        o.max_open_conns = u32::try_from(self.int("Store.MaxOpenConns").max(1)).unwrap_or(u32::MAX);
        o.conn_max_lifetime = (minutes > 0)
            .then(|| std::time::Duration::from_secs((minutes as u64).saturating_mul(60)));
        o.utc_offset_hours = utc_offset_hours;
        Ok(o)
    }

    pub fn str(&self, k: &str) -> &str {
        self.values.get(k).map(String::as_str).unwrap_or("")
    }

    pub fn int(&self, k: &str) -> i64 {
        self.str(k).trim().parse().unwrap_or(0)
    }

    /// The store driver, with dtm's `boltdb` mapped to the embedded store.
    pub fn driver(&self) -> &str {
        match self.str("Store.Driver") {
            "boltdb" | "sqlite" | "" => "sqlite",
            other => other,
        }
    }

    pub fn store_file(&self) -> PathBuf {
        PathBuf::from(self.str("Store.File"))
    }

    /// The `Store.*` values as environment variables, to start another `dtm` process on
    /// the same store.
    pub fn store_env(&self) -> Vec<(String, String)> {
        KEYS.iter()
            .filter(|k| k.path.starts_with("Store."))
            .map(|k| (env_name(k.path), self.str(k.path).to_string()))
            .collect()
    }

    /// Override one value (tests and the CLI).
    pub fn set(&mut self, k: &str, v: impl Into<String>) -> Result<(), String> {
        let key = KEYS
            .iter()
            .find(|d| d.path == k)
            .ok_or_else(|| format!("unknown config key {k}"))?;
        self.values.insert(key.path, v.into());
        Ok(())
    }

    /// The engine settings this configuration gives.
    pub fn settings(&self) -> dtm_core::Settings {
        dtm_core::Settings {
            retry_interval: self.int("RetryInterval"),
            retry_max_interval: self.int("RetryMaxInterval"),
            timeout_to_fail: self.int("TimeoutToFail"),
            request_timeout: self.int("RequestTimeout"),
            cron_interval: std::time::Duration::from_secs(
                self.int("TransCronInterval").max(1) as u64
            ),
            recovery_batch: self.int("RecoveryBatch") as usize,
            recovery_concurrency: self.int("RecoveryConcurrency") as usize,
            alert_webhook: self.str("AlertWebHook").to_string(),
            alert_retry_limit: self.int("AlertRetryLimit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_follow_dtm() {
        assert_eq!(env_name("Store.Driver"), "STORE_DRIVER");
        assert_eq!(env_name("MicroService.EndPoint"), "MICRO_SERVICE_END_POINT");
        assert_eq!(
            env_name("Log.RotationConfigJSON"),
            "LOG_ROTATION_CONFIG_JSON"
        );
        assert_eq!(env_name("TransCronInterval"), "TRANS_CRON_INTERVAL");
        assert_eq!(env_name("HttpPort"), "HTTP_PORT");
        assert_eq!(env_name("Store.Db"), "STORE_DB");
        assert_eq!(env_name("AlertWebHook"), "ALERT_WEB_HOOK");
        assert_eq!(
            env_name("UpdateBranchAsyncGoroutineNum"),
            "UPDATE_BRANCH_ASYNC_GOROUTINE_NUM"
        );
    }

    #[test]
    fn env_then_yaml() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("conf.yml");
        std::fs::write(
            &f,
            "Store:\n  Driver: boltdb\nRetryInterval: 12\nBogus: 1\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let c = Config::load(Some(&f), |k| match k {
            "RETRY_INTERVAL" => Some("11".into()),
            "HTTP_PORT" => Some("4000".into()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.int("RetryInterval"), 12, "YAML wins over env");
        assert_eq!(c.int("HttpPort"), 4000);
        assert_eq!(c.driver(), "sqlite");
        assert!(c.warnings.iter().any(|w| w.contains("Bogus")));
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::load(None, |k| (k == "RETRY_INTERVAL").then(|| "soon".into())).unwrap_err();
        assert!(e.contains("RETRY_INTERVAL") && e.contains("soon"), "{e}");
        let e = Config::load(None, |k| (k == "STORE_DRIVER").then(|| "oracle".into())).unwrap_err();
        assert!(e.contains("oracle"), "{e}");
        let e = Config::load(None, |k| (k == "TIMEOUT_TO_FAIL").then(|| "5".into())).unwrap_err();
        assert!(e.contains("TimeoutToFail"), "{e}");
    }

    #[test]
    fn sql_drivers_need_host_port_user() {
        let env = |vals: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vals.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let e = Config::load(None, env(&[("STORE_DRIVER", "postgres")])).unwrap_err();
        assert!(e.contains("STORE_HOST"), "{e}");
        let e = Config::load(
            None,
            env(&[("STORE_DRIVER", "mysql"), ("STORE_HOST", "db")]),
        )
        .unwrap_err();
        assert!(e.contains("STORE_USER"), "{e}");
        let e = Config::load(
            None,
            env(&[
                ("STORE_DRIVER", "mysql"),
                ("STORE_HOST", "db"),
                ("STORE_USER", "root"),
            ]),
        )
        .unwrap_err();
        assert!(e.contains("STORE_PORT") && e.contains("3306"), "{e}");
        let e = Config::load(
            None,
            env(&[
                ("STORE_DRIVER", "postgres"),
                ("STORE_HOST", "db"),
                ("STORE_USER", "u"),
                ("STORE_PORT", "5432"),
                ("STORE_SCHEMA", "my-schema"),
            ]),
        )
        .unwrap_err();
        assert!(e.contains("STORE_SCHEMA"), "{e}");
        let c = Config::load(
            None,
            env(&[
                ("STORE_DRIVER", "postgres"),
                ("STORE_HOST", "db"),
                ("STORE_USER", "u"),
                ("STORE_PASSWORD", "p"),
                ("STORE_PORT", "5433"),
                ("STORE_CONN_MAX_LIFE_TIME", "2"),
            ]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let o = c.sql_options().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                o.host.as_str(),
                o.port,
                o.user.as_str(),
                o.db.as_str(),
                o.schema.as_str()
            ),
            ("db", 5433, "u", "dtm", "public")
        );
        assert_eq!(
            o.conn_max_lifetime,
            Some(std::time::Duration::from_secs(120))
        );
        let e = Config::load(
            None,
            env(&[("STORE_DRIVER", "redis"), ("STORE_HOST", "db")]),
        )
        .unwrap_err();
        assert!(e.contains("STORE_PORT"), "redis needs a port too: {e}");
    }
}
