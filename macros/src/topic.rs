//! Expansion of `#[derive(Topic)]`.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::ext::IdentExt as _;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Ident, LitInt, LitStr, Path};

use kontext_names::{default_topic_name, validate_topic_name};

/// Collects every error of one derive so they are reported together.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    fn at(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.push(syn::Error::new(span, msg));
    }
}

/// The container attributes, each with the span of its key for duplicate
/// reports.
#[derive(Default)]
struct Attrs {
    name: Option<LitStr>,
    key: Option<Ident>,
    headers: Vec<(Ident, String)>,
    type_name: Option<LitStr>,
    partitions: Option<LitInt>,
    replication: Option<LitInt>,
    krate: Option<Path>,
}

pub(crate) fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let ident = &input.ident;

    if !input.generics.params.is_empty() {
        errors.at(
            input.generics.span(),
            "`#[derive(Topic)]` does not support generic types: a topic maps one concrete type",
        );
    }
    let fields = match &input.data {
        Data::Struct(s) => Some(&s.fields),
        Data::Enum(e) => {
            errors.at(
                e.enum_token.span,
                "`#[derive(Topic)]` supports structs only; declare an enum with `ModelBuilder::topic` instead",
            );
            None
        }
        Data::Union(u) => {
            errors.at(
                u.union_token.span,
                "`#[derive(Topic)]` supports structs only",
            );
            None
        }
    };

    let mut attrs = Attrs::default();
    let mut seen: Vec<String> = Vec::new();
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("topic")) {
        let result = attr.parse_nested_meta(|meta| {
            let key = meta
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            let repeatable = key == "header";
            if !repeatable && seen.contains(&key) {
                errors.at(meta.path.span(), format!("duplicate `{key}` attribute"));
                // Consume the value so parsing can go on to report more.
                if meta.input.peek(syn::Token![=]) {
                    let _: syn::Expr = meta.value()?.parse()?;
                }
                return Ok(());
            }
            seen.push(key.clone());
            match key.as_str() {
                "name" => {
                    let lit: LitStr = meta.value()?.parse()?;
                    if let Err(reason) = validate_topic_name(&lit.value()) {
                        errors.at(lit.span(), format!("illegal topic name: {reason}"));
                    }
                    attrs.name = Some(lit);
                }
                "key" => {
                    let field: Ident = meta.value()?.parse()?;
                    attrs.key = Some(field);
                }
                "header" => {
                    meta.parse_nested_meta(|h| {
                        match h.path.get_ident() {
                            Some(field) => {
                                let name = field.unraw().to_string();
                                if let Err(reason) = kontext_names::validate_header_name(&name) {
                                    errors.at(field.span(), reason);
                                }
                                attrs.headers.push((field.clone(), name));
                            }
                            None => errors.at(h.path.span(), "expected a field name"),
                        }
                        Ok(())
                    })?;
                }
                "type_name" => {
                    let lit: LitStr = meta.value()?.parse()?;
                    if lit.value().trim().is_empty() {
                        errors.at(lit.span(), "the type name is empty");
                    }
                    attrs.type_name = Some(lit);
                }
                "partitions" | "replication" => {
                    let lit: LitInt = meta.value()?.parse()?;
                    match lit.base10_parse::<i32>() {
                        Ok(n) if n >= 1 => {}
                        _ => errors.at(lit.span(), format!("`{key}` must be an integer from 1 to {}", i32::MAX)),
                    }
                    if key == "partitions" {
                        attrs.partitions = Some(lit);
                    } else {
                        attrs.replication = Some(lit);
                    }
                }
                "crate" => {
                    let lit: LitStr = meta.value()?.parse()?;
                    match lit.parse::<Path>() {
                        Ok(p) => attrs.krate = Some(p),
                        Err(_) => errors.at(lit.span(), "expected a path such as `my_app::kontext`"),
                    }
                }
                _ => {
                    errors.at(
                        meta.path.span(),
                        format!(
                            "unknown attribute `{}`; expected one of `name`, `key`, `header`, `type_name`, `partitions`, `replication`, `crate`",
                            if key.is_empty() { "?".to_owned() } else { key }
                        ),
                    );
                    if meta.input.peek(syn::Token![=]) {
                        let _: syn::Expr = meta.value()?.parse()?;
                    } else if meta.input.peek(syn::token::Paren) {
                        meta.parse_nested_meta(|n| {
                            if n.input.peek(syn::Token![=]) {
                                let _: syn::Expr = n.value()?.parse()?;
                            }
                            Ok(())
                        })?;
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            errors.push(e);
        }
    }

    // Field attributes: `#[topic(key)]`, `#[topic(header)]`, `#[topic(header = "x-name")]`.
    let named: Vec<&syn::Field> = match fields {
        Some(Fields::Named(f)) => f.named.iter().collect(),
        Some(Fields::Unnamed(f)) => {
            if attrs.key.is_some() || !attrs.headers.is_empty() {
                errors.at(
                    f.span(),
                    "key and header fields need a struct with named fields",
                );
            }
            Vec::new()
        }
        _ => Vec::new(),
    };
    for field in &named {
        let Some(field_ident) = &field.ident else {
            continue;
        };
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("topic")) {
            let result = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("key") {
                    if attrs.key.is_some() {
                        errors.at(
                            meta.path.span(),
                            "duplicate `key`: the message key is already set",
                        );
                    } else {
                        attrs.key = Some(field_ident.clone());
                    }
                } else if meta.path.is_ident("header") {
                    // A raw identifier (`r#type`) names the header `type`.
                    let (name, span) = if meta.input.peek(syn::Token![=]) {
                        let lit: LitStr = meta.value()?.parse()?;
                        (lit.value(), lit.span())
                    } else {
                        (field_ident.unraw().to_string(), field_ident.span())
                    };
                    if let Err(reason) = kontext_names::validate_header_name(&name) {
                        errors.at(span, reason);
                    }
                    attrs.headers.push((field_ident.clone(), name));
                } else {
                    errors.at(
                        meta.path.span(),
                        "unknown field attribute; expected `key`, `header` or `header = \"name\"`",
                    );
                }
                Ok(())
            });
            if let Err(e) = result {
                errors.push(e);
            }
        }
    }

    let field_exists = |f: &Ident| named.iter().any(|n| n.ident.as_ref() == Some(f));
    if fields.is_some() {
        if let Some(k) = &attrs.key {
            if !field_exists(k) {
                errors.at(
                    k.span(),
                    format!("no field `{k}` on `{ident}` to use as the key"),
                );
            }
        }
        for (f, _) in &attrs.headers {
            if !field_exists(f) {
                errors.at(
                    f.span(),
                    format!("no field `{f}` on `{ident}` to copy into a header"),
                );
            }
        }
    }
    let mut header_names: Vec<&str> = Vec::new();
    for (f, name) in &attrs.headers {
        if header_names.contains(&name.as_str()) {
            errors.at(f.span(), format!("header `{name}` is declared twice"));
        }
        header_names.push(name);
    }

    if let Some(e) = errors.0 {
        return Err(e);
    }

    let krate: Path = attrs
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::kontext));
    let name = match &attrs.name {
        Some(lit) => lit.value(),
        None => default_topic_name(&ident.to_string()),
    };
    let type_name = attrs
        .type_name
        .as_ref()
        .map_or_else(|| ident.to_string(), LitStr::value);
    let opt_i32 = |lit: &Option<LitInt>| match lit {
        Some(l) => quote!(::core::option::Option::Some(#l)),
        None => quote!(::core::option::Option::None),
    };
    let partitions = opt_i32(&attrs.partitions);
    let replication = opt_i32(&attrs.replication);
    let has_key = attrs.key.is_some();
    let key_body = match &attrs.key {
        Some(k) => quote!(#krate::model::MessageKey::write_key(&self.#k, out)),
        None => quote!({
            let _ = out;
            false
        }),
    };
    let header_pushes = attrs
        .headers
        .iter()
        .map(|(f, n)| quote!(out.push((#n, ::std::string::ToString::to_string(&self.#f)));));

    Ok(quote! {
        #[automatically_derived]
        impl #krate::Topic for #ident {
            const NAME: &'static str = #name;
            const TYPE_NAME: &'static str = #type_name;
            const PARTITIONS: ::core::option::Option<i32> = #partitions;
            const REPLICATION: ::core::option::Option<i32> = #replication;
            const HAS_KEY: bool = #has_key;

            fn write_key(&self, out: &mut ::std::vec::Vec<u8>) -> bool {
                #key_body
            }

            fn headers(&self, out: &mut ::std::vec::Vec<(&'static str, ::std::string::String)>) {
                #(#header_pushes)*
                let _ = out;
            }
        }

        #[allow(non_upper_case_globals)]
        const _: () = {
            #krate::__private::inventory::submit! {
                #krate::model::DerivedTopic::of::<#ident>()
            }
        };
    })
}

#[cfg(test)]
mod tests {
    use quote::ToTokens as _;

    /// The compile-fail cases of `tests/ui/fail` on any toolchain: every
    /// error the derive reports, in order, is the one its snapshot records.
    /// The snapshots themselves (spans, notes, rendering) are checked by
    /// `tests/ui.rs` on the toolchain they were recorded with only; this
    /// keeps the messages checked when the compiler changes.
    #[test]
    fn the_snapshots_errors_are_the_derives_errors() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/ui/fail");
        let mut cases = 0;
        for entry in std::fs::read_dir(&dir).expect("tests/ui/fail") {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("a case");
            let file = syn::parse_file(&source).expect("a case parses");
            let mut ours = Vec::new();
            for item in file.items {
                let derives_topic = match &item {
                    syn::Item::Struct(s) => derives(&s.attrs),
                    syn::Item::Enum(e) => derives(&e.attrs),
                    _ => false,
                };
                if !derives_topic {
                    continue;
                }
                let input: syn::DeriveInput =
                    syn::parse2(item.to_token_stream()).expect("a derive input");
                if let Err(e) = super::expand(input) {
                    ours.extend(e.into_iter().map(|e| e.to_string()));
                }
            }
            let snapshot =
                std::fs::read_to_string(path.with_extension("stderr")).expect("its snapshot");
            let recorded: Vec<&str> = snapshot
                .lines()
                .filter_map(|l| l.strip_prefix("error: "))
                .collect();
            assert_eq!(ours, recorded, "{}", path.display());
            assert!(!ours.is_empty(), "{} fails to compile", path.display());
            cases += 1;
        }
        assert!(cases >= 5, "found {cases} cases in {}", dir.display());
    }

    fn derives(attrs: &[syn::Attribute]) -> bool {
        attrs.iter().any(|a| {
            a.path().is_ident("derive")
                && a.parse_args_with(
                    syn::punctuated::Punctuated::<syn::Path, syn::Token![,]>::parse_terminated,
                )
                .is_ok_and(|paths| {
                    paths
                        .iter()
                        .any(|p| p.segments.last().is_some_and(|s| s.ident == "Topic"))
                })
        })
    }
}
