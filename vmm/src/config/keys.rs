//! The device grammar's `key=value,...` lists as `run` and `launch` take them for `--disk` and
//! `--net`: the aliases of the old spellings, bare switches, and the on/off values (README,
//! "One device grammar").

use crate::config::ConfigError;

/// The device grammar's other spellings of a key, shared by `run`, `launch` and the TOML file
/// (README, "One device grammar"): `(alias, key)`.
pub const KEY_ALIASES: &[(&str, &str)] =
    &[("path", "image"), ("ro", "readonly"), ("serial", "disk_id")];

/// The key an alias stands for (the key itself if it is none).
pub fn canonical_key(key: &str) -> &str {
    KEY_ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map_or(key, |(_, canonical)| canonical)
}

/// `key=value,key=value` as written on the command line, checked against the keys allowed
/// (aliases are replaced by their key first). Keys in `switches` may be written bare
/// (`readonly` = `readonly=on`).
pub fn parse_key_values(
    flag: &'static str,
    value: &str,
    allowed: &'static str,
    switches: &[&str],
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut pairs = Vec::new();
    for item in value.split(',').filter(|i| !i.is_empty()) {
        let (key, val) = match item.split_once('=') {
            Some((k, v)) => (canonical_key(k), v),
            // Boolean flags may be written bare: `readonly`.
            None if switches.contains(&canonical_key(item)) => (canonical_key(item), "on"),
            None => {
                return Err(ConfigError::NotKeyValue {
                    flag,
                    value: value.to_string(),
                    item: item.to_string(),
                })
            }
        };
        if !allowed.split(", ").any(|k| k == key) {
            let aliases: Vec<String> = KEY_ALIASES
                .iter()
                .filter(|(_, canonical)| allowed.split(", ").any(|k| k == *canonical))
                .map(|(alias, canonical)| format!("{alias} for {canonical}"))
                .collect();
            return Err(ConfigError::UnknownKey {
                flag,
                value: value.to_string(),
                key: key.to_string(),
                expected: allowed,
                aliases: if aliases.is_empty() {
                    String::new()
                } else {
                    format!(" (aliases: {})", aliases.join(", "))
                },
            });
        }
        pairs.push((key.to_string(), val.to_string()));
    }
    Ok(pairs)
}

pub fn parse_bool(
    flag: &'static str,
    value: &str,
    key: &str,
    v: &str,
) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(ConfigError::BadDevice {
            flag,
            value: value.to_string(),
            problem: format!("{key}={v}: expected on or off"),
        }),
    }
}
