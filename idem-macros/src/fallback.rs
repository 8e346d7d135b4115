//! What is emitted when the attribute is misused: the function unchanged, plus the errors.
//!
//! Keeping the function means its callers still compile, so the user sees only our errors and
//! not a cascade of "cannot find function" ones.

use proc_macro2::TokenStream;
use quote::quote;

pub fn expand(item: TokenStream, error: syn::Error) -> TokenStream {
    let errors = error.to_compile_error();
    quote! {
        #errors
        #item
    }
}
