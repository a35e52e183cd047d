//! Values that must never reach a log line.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// A password or key. `Debug` prints `<redacted>`; [`Secret::expose`] is the
/// one way to read it.
///
/// Read from settings, it takes any scalar as its text (an all-digit
/// password set through the environment arrives as a number), and a value
/// of another shape is refused without being quoted.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_required(d, "a secret").map(Secret)
    }
}

/// Reads any scalar as text: settings from the environment, or a TOML
/// integer, give numbers and booleans where kontext wants a string. Errors
/// name the shape found, never the value.
pub(crate) struct Lenient {
    pub(crate) what: &'static str,
}

impl<'de> serde::de::Visitor<'de> for Lenient {
    /// `None` for an empty value (`null`), which only optional settings take.
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (text, or a number or boolean taken as text)",
            self.what
        )
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// A required text value: any scalar, not nothing.
fn lenient_required<'de, D: serde::Deserializer<'de>>(
    d: D,
    what: &'static str,
) -> Result<String, D::Error> {
    d.deserialize_any(Lenient { what })?
        .ok_or_else(|| serde::de::Error::custom(format!("expected {what}, found nothing")))
}

/// `deserialize_with` for `Option<String>` settings: any scalar as text.
pub(crate) fn lenient_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    d.deserialize_any(Lenient { what: "a string" })
}

/// The password in a URL's user info (`scheme://user:password@host/..`),
/// as written and percent-decoded.
fn url_password(url: &str) -> Option<(&str, String)> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let password = &userinfo[userinfo.find(':')? + 1..];
    if password.is_empty() {
        return None;
    }
    let bytes = password.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                decoded.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    Some((password, String::from_utf8_lossy(&decoded).into_owned()))
}

/// `url` with its password replaced by `***`, for messages that quote it.
pub fn redact_url(url: &str) -> String {
    match url_password(url) {
        Some((raw, _)) => {
            let at = url.find("://").map_or(0, |i| i + 3);
            let (head, tail) = url.split_at(at);
            format!("{head}{}", tail.replacen(&format!(":{raw}@"), ":***@", 1))
        }
        None => url.to_owned(),
    }
}

/// `text` with every appearance of `url`, and of its password (as written
/// or decoded), replaced by their redacted forms: for errors of libraries
/// that quote the connection string.
pub(crate) fn scrub_url(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    if let Some((raw, decoded)) = url_password(url) {
        out = out.replace(raw, "***");
        if !decoded.is_empty() {
            out = out.replace(&decoded, "***");
        }
    }
    out
}

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
        "sasl.username",
        "ssl.key.pem",
        "ssl_key",
        "ssl.keystore.password",
        "ssl.key.password",
        "ssl.truststore.password",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.assertion.private.key.pem",
        // Key=value pairs sent to the broker, tokens among them.
        "sasl.oauthbearer.extensions",
    ];
    let key = key.to_ascii_lowercase();
    SENSITIVE.contains(&key.as_str())
        || key.contains("password")
        || key.contains("secret")
        || key.contains("passphrase")
        || key.ends_with(".pem")
}

/// Raw librdkafka properties (`key = value`), passed through untouched.
/// `Debug` redacts the values of sensitive keys. Read from settings, a
/// number or boolean value is taken as text (`"linger.ms" = 5` in TOML).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Properties(BTreeMap<String, LenientString>);

/// A property value: any scalar as text.
#[derive(Clone, Default, PartialEq, Eq)]
struct LenientString(String);

impl<'de> Deserialize<'de> for LenientString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_required(d, "a property value").map(LenientString)
    }
}

impl Properties {
    /// Sets a property, replacing an earlier value.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), LenientString(value.into()));
    }

    /// The value of a property.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.0.as_str())
    }

    /// All properties in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.0.as_str()))
    }

    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes a property; returns its value.
    pub(crate) fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key).map(|v| v.0)
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown: &dyn fmt::Debug = if is_sensitive_property(k) {
                    &"<redacted>"
                } else {
                    &v.0
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
    fn urls_lose_their_password_in_messages() {
        let url = "postgress://app:s3cr%21t@db.internal:5432/shop?sslmode=require";
        assert_eq!(
            redact_url(url),
            "postgress://app:***@db.internal:5432/shop?sslmode=require"
        );
        let quoted = format!("The connection string '{url}' has no supporting driver; s3cr!t");
        let scrubbed = scrub_url(&quoted, url);
        assert!(!scrubbed.contains("s3cr"), "{scrubbed}");
        assert!(
            scrubbed.contains("postgress://app:***@db.internal"),
            "{scrubbed}"
        );
        // No password, nothing to hide; an `@` in the path is not user info.
        assert_eq!(redact_url("sqlite://./a@b.db"), "sqlite://./a@b.db");
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
    }

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
