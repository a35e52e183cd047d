//! Derive macros for kontext: `#[derive(Topic)]` maps a struct to its Kafka
//! topic at compile time. Use it through `kontext::Topic`.

mod topic;

// The topic naming rules come from `kontext-names`, which the runtime uses
// too, so the derive and `ModelBuilder` can never disagree on what is legal.

use proc_macro::TokenStream;

/// Implements `kontext::Topic` and registers the type's derived settings, so
/// `ModelBuilder::topic::<T>(|t| t)` picks them up. See `kontext::Topic` for
/// the attributes.
#[proc_macro_derive(Topic, attributes(topic))]
pub fn derive_topic(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    topic::expand(input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
