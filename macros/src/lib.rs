//! Derive macros for kontext. `#[derive(Topic)]` arrives with the derive issue;
//! the crate exists now so the workspace layout is final.
