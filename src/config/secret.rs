//! Values that must never reach a log line.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// A password or key. `Debug` prints `<redacted>`; [`Secret::expose`] is the
/// one way to read it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; only for handing to the Kafka client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

/// Whether a librdkafka property holds a secret. Matches librdkafka's own
/// sensitive properties plus anything named like a password or secret, so a
/// property added in a later librdkafka release is still hidden.
pub fn is_sensitive_property(key: &str) -> bool {
    const SENSITIVE: &[&str] = &[
        "sasl.password",
        "ssl.key.pem",
        "ssl_key",
        "ssl.keystore.password",
        "ssl.key.password",
        "ssl.truststore.password",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.assertion.private.key.pem",
    ];
    let key = key.to_ascii_lowercase();
    SENSITIVE.contains(&key.as_str())
        || key.contains("password")
        || key.contains("secret")
        || key.contains("passphrase")
        || key.ends_with(".pem")
}

/// Raw librdkafka properties (`key = value`), passed through untouched.
/// `Debug` redacts the values of sensitive keys.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Properties(BTreeMap<String, String>);

impl Properties {
    /// Sets a property, replacing an earlier value.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    /// The value of a property.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// All properties in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes a property; returns its value.
    pub(crate) fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown: &dyn fmt::Debug = if is_sensitive_property(k) {
                    &"<redacted>"
                } else {
                    v
                };
                (k, shown)
            }))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(s.expose(), "hunter2");

        let mut p = Properties::default();
        p.set("sasl.password", "hunter2");
        p.set("sasl.oauthbearer.client.secret", "s3cr3t");
        p.set("some.future.password", "pw");
        p.set("socket.keepalive.enable", "true");
        let shown = format!("{p:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!shown.contains("\"pw\""), "{shown}");
        assert!(
            shown.contains("\"socket.keepalive.enable\": \"true\""),
            "{shown}"
        );
    }
}
