//! Checks of the arguments against the function they annotate, before any code is generated.

use proc_macro2::Span;
use syn::punctuated::Pair;
use syn::spanned::Spanned;
use syn::{Expr, ExprAsync, ExprCall, FnArg, Ident, ItemFn, Pat, ReturnType, Stmt, Type};

use crate::args::{push, Args, Conflict, FingerprintArg};

/// How the function's body is shaped.
pub enum Shape {
    /// `async fn`: the body is wrapped directly.
    Async,
    /// A method already rewritten by `#[async_trait]`: the body is the `async move` block
    /// inside the returned `Box::pin(...)`, the last statement of the function, which
    /// validation has taken out of the function and apart.
    AsyncTrait(Box<AsyncTraitBody>),
}

/// The `Box::pin(async move { ... })` that ends a body rewritten by `#[async_trait]`, in
/// pieces: expansion wraps `body`, puts the pieces back together and appends them to the
/// function.
pub struct AsyncTraitBody {
    /// `Box::pin(...)`, without its argument.
    pub boxed: ExprCall,
    /// `async move { ... }`, without its statements.
    pub block: ExprAsync,
    /// async-trait's first statements: a type hint and `let param = param;` rebindings. They
    /// stay outside the call, so the key expression uses the rebound parameters.
    pub setup: Vec<Stmt>,
    /// The rest, `let __ret: R = { body }; __ret`: what runs at most once.
    pub body: Vec<Stmt>,
}

/// What validation learnt: everything expansion needs beyond the arguments.
pub struct Plan {
    /// The function; under [`Shape::AsyncTrait`] without its last statement, which the shape
    /// holds.
    pub func: ItemFn,
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

pub fn validate(args: &Args, mut func: ItemFn) -> syn::Result<Plan> {
    let mut errors = None;
    let async_trait = match func.sig.asyncness {
        None => take_async_trait_body(&mut func.block.stmts),
        Some(_) => None,
    };
    let sig = &func.sig;

    if let Some(c) = &sig.constness {
        push(&mut errors, syn::Error::new(c.span, "`#[idempotent]` cannot be used on a `const fn`: remove `const` and make the function `async`"));
    }
    let shape = if let Some(body) = async_trait {
        Shape::AsyncTrait(body)
    } else if sig.asyncness.is_some() {
        Shape::Async
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
        (ReturnType::Type(_, ty), Shape::AsyncTrait(_)) => future_output(ty),
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

    let owned = borrowed_data(&func, &shape);
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
            func,
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
    if matches!(shape, Shape::AsyncTrait(_)) {
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

/// Takes the `Box::pin(async move { ... })` that ends a body rewritten by `#[async_trait]` out
/// of the statements, in pieces; `None`, the statements untouched, if it is not there.
fn take_async_trait_body(stmts: &mut Vec<Stmt>) -> Option<Box<AsyncTraitBody>> {
    let mut boxed = match stmts.pop()? {
        Stmt::Expr(Expr::Call(call), None) => call,
        other => {
            stmts.push(other);
            return None;
        }
    };
    match boxed.args.pop().map(Pair::into_tuple) {
        Some((Expr::Async(mut block), _))
            if block.capture.is_some() && boxed.args.is_empty() && is_box_pin(&boxed.func) =>
        {
            let mut setup = std::mem::take(&mut block.block.stmts);
            let body = setup.split_off(setup.iter().position(is_ret_binding).unwrap_or(0));
            Some(Box::new(AsyncTraitBody {
                boxed,
                block,
                setup,
                body,
            }))
        }
        last => {
            // Not async-trait's: put it back as it was.
            boxed
                .args
                .extend(last.map(|(arg, comma)| Pair::new(arg, comma)));
            stmts.push(Stmt::Expr(Expr::Call(boxed), None));
            None
        }
    }
}

/// A path ending in `Box::pin`.
fn is_box_pin(callee: &Expr) -> bool {
    let Expr::Path(path) = callee else {
        return false;
    };
    let segs: Vec<_> = path
        .path
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    segs.ends_with(&["Box".to_string(), "pin".to_string()])
}

/// `let __ret: R = ...;`, the statement async-trait binds the body's value with.
fn is_ret_binding(stmt: &Stmt) -> bool {
    matches!(stmt, Stmt::Local(local) if matches!(&local.pat, Pat::Type(t) if matches!(&*t.pat, Pat::Ident(i) if i.ident == "__ret")))
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
