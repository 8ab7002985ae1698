//! Configuration of the Redis store (`Store.Driver: redis`), kept apart from the other
//! drivers' settings.

use dtm_store::RedisOptions;

use crate::config::{Config, env_name};

/// Store options from `Store.Host` (a comma-separated list means a Redis Cluster),
/// `Store.Port`, `Store.User`, `Store.Password`, `Store.RedisPrefix`, `Store.RedisShards`
/// and `Store.FinishedDataExpire`. Errors name the key and what to set.
pub fn options(cfg: &Config) -> Result<RedisOptions, String> {
    if cfg.driver() != "redis" {
        return Err(format!("Store.Driver '{}' is not redis", cfg.driver()));
    }
    let mut o = RedisOptions::from_host_port(cfg.str("Store.Host"), cfg.int("Store.Port"))?;
    o.user = cfg.str("Store.User").to_string();
    o.password = cfg.str("Store.Password").to_string();
    o.prefix = cfg.str("Store.RedisPrefix").to_string();
    let shards = cfg.int("Store.RedisShards");
    o.shards = u32::try_from(shards)
        .ok()
        .filter(|n| (1..=1024).contains(n))
        .ok_or_else(|| {
            format!(
                "Store.RedisShards ({}) must be 1-1024, got {shards}",
                env_name("Store.RedisShards")
            )
        })?;
    o.finished_ttl_secs = cfg.int("Store.FinishedDataExpire");
    if o.finished_ttl_secs < 0 {
        return Err(format!(
            "Store.FinishedDataExpire ({}) must be 0 (keep finished transactions) or a number of seconds, got {}",
            env_name("Store.FinishedDataExpire"),
            o.finished_ttl_secs
        ));
    }
    Ok(o)
}

/// Check the Redis settings; returns warnings worth logging at start.
pub fn validate(cfg: &Config) -> Result<Vec<String>, String> {
    let o = options(cfg)?;
    let mut warnings = Vec::new();
    if let Some(open) = o.prefix.find('{')
        && o.prefix[open..].find('}').is_some_and(|close| close > 1)
    {
        warnings.push(format!(
            "Store.RedisPrefix '{}' contains a Redis hash tag: every key lands in one cluster slot, so a Redis Cluster cannot spread the load; use a prefix without braces such as dtm:",
            o.prefix
        ));
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Config, String> {
        Config::load(None, |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    fn fails(env: &[(&str, &str)]) -> String {
        match load(env) {
            Ok(_) => panic!("{env:?} should be rejected"),
            Err(e) => e,
        }
    }

    #[test]
    fn host_and_port_are_required() {
        let e = fails(&[("STORE_DRIVER", "redis")]);
        assert!(e.contains("STORE_HOST"), "{e}");
        let e = fails(&[("STORE_DRIVER", "redis"), ("STORE_HOST", "localhost")]);
        assert!(e.contains("STORE_PORT"), "{e}");
        let e = fails(&[("STORE_DRIVER", "redis"), ("STORE_HOST", "h:99999")]);
        assert!(e.contains("h:99999"), "{e}");
    }

    #[test]
    fn single_node_and_cluster() {
        let c = load(&[
            ("STORE_DRIVER", "redis"),
            ("STORE_HOST", "localhost"),
            ("STORE_PORT", "6379"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let o = options(&c).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.nodes, vec![("localhost".to_string(), 6379)]);
        assert!(!o.cluster);
        assert_eq!((o.prefix.as_str(), o.shards), ("dtm:", 16));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = load(&[
            ("STORE_DRIVER", "redis"),
            ("STORE_HOST", "a:7001, b:7002,c"),
            ("STORE_PORT", "7003"),
            ("STORE_REDIS_PREFIX", "{a}"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let o = options(&c).unwrap_or_else(|e| panic!("{e}"));
        assert!(o.cluster);
        assert_eq!(o.nodes.len(), 3);
        assert_eq!(o.nodes[2], ("c".to_string(), 7003));
        assert!(
            c.warnings.iter().any(|w| w.contains("hash tag")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn shard_count_is_bounded() {
        let e = fails(&[
            ("STORE_DRIVER", "redis"),
            ("STORE_HOST", "h:1"),
            ("STORE_REDIS_SHARDS", "0"),
        ]);
        assert!(e.contains("STORE_REDIS_SHARDS"), "{e}");
    }
}
