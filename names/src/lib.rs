//! Kafka topic names: the legality rules and the default name derived from
//! a type, shared by kontext's `ModelBuilder` and its `#[derive(Topic)]`
//! so the two never disagree on what is legal.

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// Checks a topic name against Kafka's rules: 1 to 249 characters from
/// `[a-zA-Z0-9._-]`, and neither `.` nor `..`. Returns why it is illegal.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is reserved"));
    }
    if name.len() > MAX_TOPIC_NAME_LEN {
        return Err(format!(
            "the name is {} characters long; Kafka allows at most {MAX_TOPIC_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{bad}` is not allowed; use only ASCII letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// The last path segment of a Rust type name, without generic arguments:
/// `shop::events::OrderCreated` gives `OrderCreated`. Used as the default type
/// discriminator.
pub fn short_type_name(full: &str) -> &str {
    let no_generics = full.split('<').next().unwrap_or(full);
    no_generics.rsplit("::").next().unwrap_or(no_generics)
}

/// The default topic name of a type: its short name in kebab case,
/// `OrderCreated` gives `order-created`, `HTTPRequestLogged` gives
/// `http-request-logged`.
pub fn default_topic_name(full_type_name: &str) -> String {
    let short: Vec<char> = short_type_name(full_type_name).chars().collect();
    let mut out = String::with_capacity(short.len() + 4);
    for (i, &c) in short.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev_lower =
                i > 0 && (short[i - 1].is_ascii_lowercase() || short[i - 1].is_ascii_digit());
            let acronym_end = i > 0
                && short[i - 1].is_ascii_uppercase()
                && short.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if prev_lower || acronym_end {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else if c == '_' {
            out.push('-');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_rules() {
        assert!(validate_topic_name("shipping.shipment.created").is_ok());
        assert!(validate_topic_name("dlq-events_v2").is_ok());
        assert!(validate_topic_name(&"a".repeat(249)).is_ok());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name(".").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("...").is_ok());
        let err = validate_topic_name("orders/created").unwrap_err();
        assert!(err.contains('/'), "{err}");
        assert!(validate_topic_name("ordérs").is_err());
        assert!(validate_topic_name("has space").is_err());
    }

    #[test]
    fn default_names() {
        assert_eq!(
            short_type_name("shop::events::OrderCreated"),
            "OrderCreated"
        );
        assert_eq!(short_type_name("shop::Envelope<shop::X>"), "Envelope");
        assert_eq!(default_topic_name("shop::OrderCreated"), "order-created");
        assert_eq!(
            default_topic_name("HTTPRequestLogged"),
            "http-request-logged"
        );
        assert_eq!(default_topic_name("OrderCreatedV2"), "order-created-v2");
        assert_eq!(default_topic_name("order_paid"), "order-paid");
        assert!(validate_topic_name(&default_topic_name("a::B<c::D>")).is_ok());
    }
}

/// The standard headers kontext writes on every message; a declared or
/// derived header may not take one of these names, so a message never
/// carries two ids or two types.
pub const RESERVED_HEADERS: &[&str] = &[
    "ce_specversion",
    "ce_id",
    "ce_type",
    "ce_source",
    "ce_time",
    "ce_correlationid",
    "content-type",
];

/// Checks a header name a type declares or derives: not empty, not one of
/// [`RESERVED_HEADERS`] (compared without regard to case, as clients in
/// other languages look headers up). Returns why it is refused.
pub fn validate_header_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("a header name may not be empty".into());
    }
    if let Some(r) = RESERVED_HEADERS
        .iter()
        .find(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "header `{name}` is reserved for kontext's standard header `{r}`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod header_tests {
    use super::*;

    #[test]
    fn header_names_are_checked() {
        assert!(validate_header_name("tenant").is_ok());
        assert!(validate_header_name("").is_err());
        assert!(validate_header_name("  ").is_err());
        assert!(
            validate_header_name("CE_Type")
                .unwrap_err()
                .contains("`ce_type`")
        );
    }
}
