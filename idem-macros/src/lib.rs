//! The `#[idempotent]` attribute. Use it through the `idem` crate, which documents it.
//!
//! This crate only parses, checks and generates: the expansion is one call into
//! `::idem::__private`, where all behaviour lives.

mod args;
mod duration;
mod expand;
mod fallback;
mod validate;

use proc_macro::TokenStream;

/// Makes an async function idempotent. See the `idem` crate for the arguments.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(args.into(), item.into()).into()
}
