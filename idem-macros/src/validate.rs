//! Checks of the arguments against the function they annotate, before any code is generated.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Expr, FnArg, Ident, ItemFn, Pat, ReturnType, Stmt, Type};

use crate::args::{push, Args, Conflict, FingerprintArg};

/// How the function's body is shaped.
pub enum Shape {
    /// `async fn`: the body is wrapped directly.
    Async,
    /// A method already rewritten by `#[async_trait]`: the body is the `async move` block
    /// inside the returned `Box::pin(...)`, the last statement of the function.
    AsyncTrait,
}

/// What validation learnt: everything expansion needs beyond the arguments.
pub struct Plan {
    pub shape: Shape,
    /// Parameters that make up the default fingerprint, in order.
    pub fingerprinted: Vec<Ident>,
    /// The `Result<T, E>` the body produces (`None` when only inference can tell, under
    /// `#[async_trait]`).
    pub ret: Option<Type>,
    /// Whether the body runs on a task of its own (`Call::run_detached`), so that it finishes
    /// when the caller stops waiting: the default when the function owns all its data (no
    /// reference receiver, no borrowed parameters, no generics), `detach = false` turns it off.
    pub detach: bool,
}

pub fn validate(args: &Args, func: &ItemFn) -> syn::Result<Plan> {
    let mut errors = None;
    let sig = &func.sig;

    if let Some(c) = &sig.constness {
        push(&mut errors, syn::Error::new(c.span, "`#[idempotent]` cannot be used on a `const fn`: remove `const` and make the function `async`"));
    }
    let shape = if sig.asyncness.is_some() {
        Shape::Async
    } else if async_trait_block(func).is_some() {
        Shape::AsyncTrait
    } else if sig.constness.is_some() {
        // Already reported at `const`; one mistake, one error.
        Shape::Async
    } else {
        push(
            &mut errors,
            syn::Error::new(
                sig.fn_token.span,
                "`#[idempotent]` works on `async fn` only: add `async` before `fn`",
            ),
        );
        Shape::Async
    };

    let ret = match (&sig.output, &shape) {
        (ReturnType::Default, _) => {
            push(&mut errors, syn::Error::new(sig.ident.span(), "`#[idempotent]` functions must return `Result<T, E>` (`T: Serialize + DeserializeOwned`, `E: From<idempotency::Error>`): add a return type"));
            None
        }
        (ReturnType::Type(_, ty), Shape::Async) => Some((**ty).clone()),
        (ReturnType::Type(_, ty), Shape::AsyncTrait) => future_output(ty),
    };

    let params: Vec<(&Pat, Span)> = sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(t) => Some((&*t.pat, t.pat.span())),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let name_of = |pat: &Pat| match pat {
        Pat::Ident(p) => Some(p.ident.clone()),
        _ => None,
    };
    let names: Vec<Ident> = params.iter().filter_map(|(p, _)| name_of(p)).collect();

    if let Some(skip) = &args.skip {
        for ident in &skip.value {
            if ident == "self" {
                // Accepted (the `#[instrument(skip(self))]` habit): `self` is never part of
                // the fingerprint anyway.
            } else if !names.iter().any(|n| n == ident) {
                let list = names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let have = if list.is_empty() {
                    "the function has no named parameters".to_string()
                } else {
                    format!("parameters are {list}")
                };
                push(
                    &mut errors,
                    syn::Error::new(
                        ident.span(),
                        format!("`skip({ident})`: no parameter named `{ident}`; {have}"),
                    ),
                );
            }
        }
        if args.fingerprint.is_some() {
            push(&mut errors, syn::Error::new(skip.name, "`skip` only shapes the default fingerprint: remove it, or remove `fingerprint = ...`"));
        }
    }

    if let (Some(fp), None) = (&args.fingerprint, &args.key) {
        if let FingerprintArg::Off(span) = fp.value {
            push(&mut errors, syn::Error::new(span, "`fingerprint = false` needs a `key = ...`: without a key, calls are keyed by their fingerprint"));
        }
    }

    if let (Some(c), Some(w)) = (&args.on_conflict, &args.wait) {
        if c.value == Conflict::Reject {
            push(
                &mut errors,
                syn::Error::new(
                    w.name,
                    "`wait = ...` contradicts `on_conflict = \"reject\"`: remove one of them",
                ),
            );
        }
    }

    let mut fingerprinted = Vec::new();
    if args.fingerprint.is_none() {
        let skipped = |i: &Ident| {
            args.skip
                .as_ref()
                .is_some_and(|s| s.value.iter().any(|x| x == i))
        };
        for (pat, span) in &params {
            match name_of(pat) {
                Some(ident) if skipped(&ident) => {}
                Some(ident) => fingerprinted.push(ident),
                None => push(&mut errors, syn::Error::new(*span, "a destructured parameter cannot be fingerprinted: bind it to a name (and `skip` it if needed), or give `fingerprint = ...`")),
            }
        }
    }

    let owned = borrowed_data(func, &shape);
    let detach = match (&args.detach, &owned) {
        (Some(d), Err(why)) if d.value.value => {
            push(&mut errors, syn::Error::new(d.value.span, format!("`detach = true` needs a body that owns its data, so it can run on after the caller stops waiting, but {why}: take owned values (`String`, `Arc<T>`, ...) or remove `detach`")));
            false
        }
        (Some(d), _) => d.value.value,
        (None, owned) => owned.is_ok(),
    };

    match errors {
        Some(e) => Err(e),
        None => Ok(Plan {
            shape,
            fingerprinted,
            ret,
            detach,
        }),
    }
}

/// `Ok` if the function's body can own all it uses (so it can run on its own task), else why
/// not.
fn borrowed_data(func: &ItemFn, shape: &Shape) -> Result<(), &'static str> {
    use syn::visit::Visit;
    struct Borrows(bool);
    impl<'a> Visit<'a> for Borrows {
        fn visit_type_reference(&mut self, _: &'a syn::TypeReference) {
            self.0 = true;
        }
        fn visit_lifetime(&mut self, _: &'a syn::Lifetime) {
            self.0 = true;
        }
        fn visit_type_impl_trait(&mut self, _: &'a syn::TypeImplTrait) {
            self.0 = true;
        }
    }
    let sig = &func.sig;
    if matches!(shape, Shape::AsyncTrait) {
        return Err("`#[async_trait]` already boxed its future");
    }
    if sig.receiver().is_some() {
        return Err("the method borrows `self`");
    }
    if !sig.generics.params.is_empty() {
        return Err("the function is generic");
    }
    let mut borrows = Borrows(false);
    for arg in &sig.inputs {
        if let FnArg::Typed(t) = arg {
            borrows.visit_type(&t.ty);
        }
    }
    if borrows.0 {
        return Err("a parameter borrows (`&`, a lifetime, or `impl Trait`)");
    }
    Ok(())
}

/// The `async move { ... }` block of a body rewritten by `#[async_trait]`:
/// `Box::pin(async move { ... })` as the function's last statement.
pub fn async_trait_block(func: &ItemFn) -> Option<&syn::ExprAsync> {
    let Some(Stmt::Expr(Expr::Call(call), None)) = func.block.stmts.last() else {
        return None;
    };
    let Expr::Path(path) = &*call.func else {
        return None;
    };
    let segs: Vec<_> = path
        .path
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    if !segs.ends_with(&["Box".to_string(), "pin".to_string()]) || call.args.len() != 1 {
        return None;
    }
    match call.args.first() {
        Some(Expr::Async(block)) if block.capture.is_some() => Some(block),
        _ => None,
    }
}

/// `Output` of `Pin<Box<dyn Future<Output = R> + ...>>`.
fn future_output(ty: &Type) -> Option<Type> {
    use syn::visit::Visit;
    struct Find(Option<Type>);
    impl<'a> Visit<'a> for Find {
        fn visit_assoc_type(&mut self, a: &'a syn::AssocType) {
            if a.ident == "Output" && self.0.is_none() {
                self.0 = Some(a.ty.clone());
            }
        }
    }
    let mut f = Find(None);
    f.visit_type(ty);
    f.0
}
