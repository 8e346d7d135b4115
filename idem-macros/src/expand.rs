//! Code generation: the annotated function's body becomes one call,
//! `::idempotency::__private::keyed(..)...run(policy, async { body }).await`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, ItemFn, Stmt};

use crate::args::{self, Args, CacheErrors, Conflict, DurationArg, FingerprintArg, Unknown};
use crate::fallback;
use crate::validate::{self, AsyncTraitBody, Plan, Shape};

pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(e) => {
            let e = syn::Error::new(
                e.span(),
                format!("`#[idempotent]` goes on an `async fn` with a body: {e}"),
            );
            return fallback::expand(item, e);
        }
    };
    let parsed = args::parse(args);
    // Report argument errors and signature errors together.
    let (args, plan) = match parsed {
        Ok(args) => match validate::validate(&args, func) {
            Ok(plan) => (args, plan),
            Err(e) => return fallback::expand(item, e),
        },
        Err(mut e) => {
            if let Err(more) = validate::validate(&Args::default(), func) {
                e.combine(more);
            }
            return fallback::expand(item, e);
        }
    };
    expand(args, plan)
}

fn expand(mut args: Args, plan: Plan) -> TokenStream {
    let Plan {
        mut func,
        shape,
        fingerprinted,
        ret,
        detach,
    } = plan;
    if matches!(shape, Shape::AsyncTrait(_)) && func.sig.receiver().is_some() {
        // async-trait moves `self` into `__self` before the body; our arguments run after that
        // rebinding, so they must say `__self` too (as async-trait does for the body).
        for expr in [
            args.key.as_mut(),
            args.store.as_mut(),
            args.scope.as_mut(),
            args.max_record_bytes.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            expr.value = rename_self(&expr.value);
        }
        if let Some(fp) = args.fingerprint.as_mut() {
            if let FingerprintArg::Expr(e) = &mut fp.value {
                **e = rename_self(e);
            }
        }
    }

    // Runtime paths carry the return type's span: rustc reports an unusable return type at
    // the first token of the call chain, which is then the user's signature, not the attribute.
    let ret_span = ret
        .as_ref()
        .map(|r| r.span())
        .unwrap_or_else(Span::call_site);
    // The facade's path: `crate = path` if given, else `::idempotency`, written with the span the
    // tokens around it need (the path's own tokens keep theirs).
    let krate = |span: Span| match &args.krate {
        Some(k) => {
            let path = &k.value;
            quote!(#path)
        }
        None => quote_spanned!(span=> ::idempotency),
    };
    let p = {
        let krate = krate(ret_span);
        quote_spanned!(ret_span=> #krate::__private)
    };
    let fn_name = func.sig.ident.to_string();

    let scope = match &args.scope {
        Some(s) => {
            let e = &s.value;
            quote!(&(#e))
        }
        None => quote!(""),
    };
    let operation = match &args.name {
        Some(name) => {
            let lit = &name.value;
            quote!(#p::Operation::named(#lit))
        }
        None => {
            quote!(#p::Operation::from_path(::core::concat!(::core::module_path!(), "::", #fn_name)))
        }
    };

    let default_fingerprint = {
        let adds = fingerprinted.iter().map(|ident| {
            // Spanned at the parameter, so "Serialize is not implemented" points at it.
            quote_spanned!(ident.span()=> __idem_fp.add(&#ident)?;)
        });
        quote!(#p::fingerprint_with(|__idem_fp| { #(#adds)* ::core::result::Result::Ok(()) }))
    };

    let call = match (&args.key, &args.fingerprint) {
        (None, _) => quote!(#p::by_content(#operation, #scope, #default_fingerprint)),
        (Some(key), fp) => {
            let key = &key.value;
            let fp = match fp.as_ref().map(|f| &f.value) {
                None => quote!(#default_fingerprint.map(::core::option::Option::Some)),
                Some(FingerprintArg::Off(_)) => {
                    quote!(::core::result::Result::Ok(::core::option::Option::None))
                }
                Some(FingerprintArg::Expr(e)) => {
                    quote_spanned!(e.span()=> #p::Fingerprint::of(&(#e)).map(::core::option::Option::Some))
                }
            };
            let key_span = key.span();
            quote_spanned!(key_span=> #p::keyed(#operation, #scope, &(#key), #fp))
        }
    };

    let duration = |d: &DurationArg| match d {
        DurationArg::Millis(ms) => quote!(::core::time::Duration::from_millis(#ms)),
        DurationArg::Expr(e) => quote_spanned!(e.span()=> #p::IntoDuration::into_duration(#e)),
    };
    let mut settings = TokenStream::new();
    if let Some(ttl) = &args.ttl {
        let d = duration(&ttl.value);
        settings.extend(quote!(.ttl(#d)));
    }
    let lease = args.lease.as_ref().map(|l| duration(&l.value));
    if let Some(lease) = &lease {
        settings.extend(quote!(.lease(#lease)));
    }
    let wait = match (&args.wait, args.on_conflict.as_ref().map(|c| c.value)) {
        (Some(w), _) => Some(duration(&w.value)),
        // `on_conflict = "wait"` without a limit waits for the holder's lease and a takeover.
        (None, Some(Conflict::Wait)) => {
            let lease = lease.clone().unwrap_or_else(|| quote!(#p::DEFAULT_LEASE));
            Some(quote!(#p::default_wait(#lease)))
        }
        _ => None,
    };
    if let Some(w) = wait {
        settings.extend(quote!(.on_conflict(#p::OnConflict::Wait(#w))));
    }
    if let Some(v) = &args.version {
        let lit = &v.value;
        settings.extend(quote!(.version(#lit)));
    }
    if let Some(u) = &args.on_unknown {
        let v = match u.value {
            Unknown::Refuse => quote!(Refuse),
            Unknown::Rerun => quote!(Rerun),
        };
        settings.extend(quote!(.on_unknown(#p::OnUnknown::#v)));
    }
    if let Some(r) = &args.recovery {
        let d = duration(&r.value);
        settings.extend(quote!(.recovery(#d)));
    }
    if let Some(limit) = &args.max_record_bytes {
        let e = &limit.value;
        settings.extend(quote_spanned!(e.span()=> .max_record_bytes(#e)));
    }
    let bind_store = args.store.as_ref().map(|s| {
        let e = &s.value;
        // Spanned at the expression, so a value that is not a store is reported there.
        settings.extend(quote_spanned!(e.span()=> .store(__idem_store)));
        quote_spanned!(e.span()=> let __idem_store = #e;)
    });
    // Last: `on_replay` turns the call into one that can only be run.
    if let Some(hook) = &args.on_replay {
        let path = &hook.value;
        let span = path.span();
        let krate = krate(span);
        // Checked against the return type at the path, so a hook of another type is reported
        // there (under `#[async_trait]` only inference knows the type: checked by `run`).
        let hook = match &ret {
            Some(ret) => quote_spanned!(span=> #krate::__private::on_replay::<#ret>(#path)),
            None => quote!(#path),
        };
        settings.extend(quote_spanned!(span=> .on_replay(#hook)));
    }

    let policy = match args
        .cache_errors
        .as_ref()
        .and_then(|c| c.value.as_ref().map(|v| (c.name, v)))
    {
        None => quote!(#p::ErrorPolicy::never()),
        // Paths written out (not `#p`) so every token carries the argument's span and a
        // missing `Serialize` on the error type is reported at `cache_errors`.
        Some((name, CacheErrors::All)) => {
            let krate = krate(name);
            quote_spanned!(name=> #krate::__private::ErrorPolicy::always())
        }
        Some((_, CacheErrors::When(path))) => {
            let krate = krate(path.span());
            quote_spanned!(path.span()=> #krate::__private::ErrorPolicy::when(#path))
        }
    };

    let run_with = |body: TokenStream| {
        // The whole call carries the return type's span, so an unusable return type is
        // reported once, at the user's signature.
        // A body that owns its data runs on its own task and finishes if the caller stops
        // waiting (`async move` so that it owns the parameters).
        let (run, capture) = if detach {
            (
                proc_macro2::Ident::new("run_detached_replaying", ret_span),
                quote_spanned!(ret_span=> move),
            )
        } else {
            (
                proc_macro2::Ident::new("run_replaying", ret_span),
                TokenStream::new(),
            )
        };
        // Replays clone a decoded value when the `Ok` type is `Clone` (autoref
        // specialization on the return type: see `engine::decoded`); else they decode.
        let call = match &ret {
            Some(ret) => {
                let replayer = quote_spanned!(ret_span=> {
                    #[allow(unused_imports)]
                    use #p::{ViaClone as _, ViaDecode as _};
                    (&&#p::Probe::<#ret>::new()).replayer()
                });
                quote_spanned!(ret_span=> #call #settings .#run::<#ret, _>(#policy, #replayer, async #capture #body).await)
            }
            None => {
                quote!(#call #settings .#run(#policy, #p::Decoding, async #capture #body).await)
            }
        };
        quote! {
            #bind_store
            #call
        }
    };

    match shape {
        Shape::Async => {
            let block = &func.block;
            let body = run_with(quote!(#block));
            // Keep the user's braces (and so the item's span): an item whose span came from the
            // macro would get no `dead_code` warning when it is never used.
            let block: syn::Block = syn::parse_quote!({ #body });
            func.block.stmts = block.stmts;
        }
        Shape::AsyncTrait(async_trait) => {
            let AsyncTraitBody {
                mut boxed,
                mut block,
                setup,
                body,
            } = *async_trait;
            // async-trait's setup stays outside, so the key expression uses the rebound
            // parameters; the rest is wrapped.
            let run = run_with(quote!({ #(#body)* }));
            block.block = syn::parse_quote!({ #(#setup)* #run });
            boxed.args.push(Expr::Async(block));
            func.block.stmts.push(Stmt::Expr(Expr::Call(boxed), None));
        }
    }
    // Lints the expansion could trip in user crates.
    func.attrs.push(syn::parse_quote!(#[allow(clippy::used_underscore_binding, clippy::redundant_closure_call, clippy::needless_question_mark)]));
    quote!(#func)
}

/// `self` → `__self` in an expression, token by token so that macro arguments
/// (`format!("{}", self.id)`) are renamed too.
fn rename_self(expr: &Expr) -> Expr {
    fn walk(tokens: TokenStream) -> TokenStream {
        tokens
            .into_iter()
            .map(|tt| match tt {
                proc_macro2::TokenTree::Ident(i) if i == "self" => {
                    proc_macro2::TokenTree::Ident(proc_macro2::Ident::new("__self", i.span()))
                }
                proc_macro2::TokenTree::Group(g) => {
                    let mut ng = proc_macro2::Group::new(g.delimiter(), walk(g.stream()));
                    ng.set_span(g.span());
                    proc_macro2::TokenTree::Group(ng)
                }
                other => other,
            })
            .collect()
    }
    syn::parse2(walk(quote!(#expr))).unwrap_or_else(|_| expr.clone())
}
