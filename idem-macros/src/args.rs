//! Parsing of `#[idempotent(...)]` arguments: one table ([`ARGUMENTS`]) of argument names and
//! their parsers, every value keeping its span, all errors of the list reported together.

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned as _;
use syn::{Expr, ExprLit, Ident, Lit, LitStr, Path, Token};

use crate::duration::parse_millis;

/// The runtime's `MIN_LEASE`, checked at compile time for literal leases.
const MIN_LEASE_MS: u64 = 100;

/// A duration argument: a literal checked now, or an expression evaluated at run time.
pub enum DurationArg {
    /// `"24h"` or `3600` (seconds), in milliseconds.
    Millis(u64),
    /// Any other expression: a `std::time::Duration` or integer seconds.
    Expr(Box<Expr>),
}

/// `fingerprint = ...`
pub enum FingerprintArg {
    /// `fingerprint = false`: no check on key reuse.
    Off(Span),
    /// `fingerprint = EXPR`: the fingerprint of this value.
    Expr(Box<Expr>),
}

/// `on_conflict = ...`
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    Reject,
    Wait,
}

/// `on_unknown = ...`
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// `"refuse"`: at most once (the runtime's default).
    Refuse,
    /// `"rerun"`: at least once.
    Rerun,
}

/// `cache_errors = ...`
pub enum CacheErrors {
    /// `cache_errors = true` (`false` is the default and parses to `None`).
    All,
    /// `cache_errors = path::to::predicate`.
    When(Path),
}

/// An argument's value with the span of its name, for "first set here" and cross-argument
/// errors.
pub struct Arg<T> {
    pub name: Span,
    pub value: T,
}

#[derive(Default)]
pub struct Args {
    pub key: Option<Arg<Expr>>,
    pub ttl: Option<Arg<DurationArg>>,
    pub lease: Option<Arg<DurationArg>>,
    pub store: Option<Arg<Expr>>,
    pub scope: Option<Arg<Expr>>,
    pub skip: Option<Arg<Vec<Ident>>>,
    pub fingerprint: Option<Arg<FingerprintArg>>,
    pub on_conflict: Option<Arg<Conflict>>,
    pub wait: Option<Arg<DurationArg>>,
    pub cache_errors: Option<Arg<Option<CacheErrors>>>,
    /// `on_replay = path::to::hook`: a `fn(T, &ReplayInfo) -> T` applied to replayed values.
    pub on_replay: Option<Arg<Path>>,
    /// `max_record_bytes = N` (a literal, checked) or an expression giving a `usize`.
    pub max_record_bytes: Option<Arg<Expr>>,
    pub on_unknown: Option<Arg<Unknown>>,
    pub recovery: Option<Arg<DurationArg>>,
    /// `detach = true | false`, with the literal's span.
    pub detach: Option<Arg<syn::LitBool>>,
    /// `name = "billing.charge"`: the operation's stable name.
    pub name: Option<Arg<LitStr>>,
    /// `version = N`: the result's schema version.
    pub version: Option<Arg<syn::LitInt>>,
    /// `crate = path`: where the facade crate is, for users who renamed the dependency.
    pub krate: Option<Arg<Path>>,
}

impl Parse for Args {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut args = Args::default();
        let mut errors: Option<syn::Error> = None;
        while !input.is_empty() {
            if let Err(e) = args.parse_one(input) {
                push(&mut errors, e);
                // Skip to the next top-level comma and go on, so every mistake is reported.
                while !input.is_empty() && !input.peek(Token![,]) {
                    input.parse::<TokenTree>()?;
                }
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        match errors {
            Some(e) => Err(e),
            None => Ok(args),
        }
    }
}

pub fn push(errors: &mut Option<syn::Error>, e: syn::Error) {
    match errors {
        Some(all) => all.combine(e),
        None => *errors = Some(e),
    }
}

/// An argument's name where it is written: its span, and its spelling in [`ARGUMENTS`].
#[derive(Clone, Copy)]
pub struct Name {
    span: Span,
    text: &'static str,
}

/// Stores a parsed argument, or reports it as a duplicate pointing at both places.
fn set<T>(slot: &mut Option<Arg<T>>, name: Name, value: T) -> syn::Result<()> {
    let Name { span, text } = name;
    if let Some(first) = slot {
        let mut e = syn::Error::new(span, format!("duplicate argument `{text}`: give it once"));
        e.combine(syn::Error::new(
            first.name,
            format!("`{text}` first set here"),
        ));
        return Err(e);
    }
    *slot = Some(Arg { name: span, value });
    Ok(())
}

/// How one argument is parsed after its name: `=` and the value, or `(...)`.
type ParseArg = fn(&mut Args, Name, ParseStream) -> syn::Result<()>;

/// Every argument of `#[idempotent(...)]`, in the order the docs and "expected one of" list
/// them: the one place that says which arguments exist.
pub const ARGUMENTS: &[(&str, ParseArg)] = &[
    ("name", parse_name),
    ("key", parse_key),
    ("scope", parse_scope),
    ("ttl", parse_ttl),
    ("lease", parse_lease),
    ("store", parse_store),
    ("skip", parse_skip),
    ("fingerprint", parse_fingerprint),
    ("on_conflict", parse_on_conflict),
    ("wait", parse_wait),
    ("cache_errors", parse_cache_errors),
    ("on_replay", parse_on_replay),
    ("max_record_bytes", parse_max_record_bytes),
    ("on_unknown", parse_on_unknown),
    ("recovery", parse_recovery),
    ("version", parse_version),
    ("detach", parse_detach),
    ("crate", parse_krate),
];

/// "`key`, `ttl`, ...": the argument names, for error messages.
fn argument_list() -> String {
    ARGUMENTS
        .iter()
        .map(|(name, _)| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Args {
    fn parse_one(&mut self, input: ParseStream) -> syn::Result<()> {
        if !input.peek(Ident::peek_any) {
            return Err(input.error(format!("expected one of {}", argument_list())));
        }
        // `Ident::parse_any` also takes `crate`, a keyword.
        let ident = Ident::parse_any(input)?;
        match ARGUMENTS.iter().find(|(name, _)| ident == name) {
            Some(&(text, parse)) => {
                let name = Name {
                    span: ident.span(),
                    text,
                };
                parse(self, name, input)
            }
            None => Err(syn::Error::new(
                ident.span(),
                format!(
                    "unknown argument `{ident}`: expected one of {}",
                    argument_list()
                ),
            )),
        }
    }
}

fn parse_key(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    set(&mut args.key, name, input.parse()?)
}

fn parse_ttl(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let value = parse_duration(input, name.text)?;
    set(&mut args.ttl, name, value)
}

fn parse_lease(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let value = parse_duration(input, name.text)?;
    if let DurationArg::Millis(ms) = value {
        if ms < MIN_LEASE_MS {
            return Err(syn::Error::new(
                    name.span,
                    format!("`lease` must be at least {MIN_LEASE_MS}ms: a shorter lease expires before the claim can be renewed, and concurrent callers would all run the body"),
                ));
        }
    }
    set(&mut args.lease, name, value)
}

fn parse_store(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    set(&mut args.store, name, input.parse()?)
}

fn parse_scope(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    set(&mut args.scope, name, input.parse()?)
}

fn parse_skip(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    let content;
    syn::parenthesized!(content in input);
    // `Ident::parse_any` takes `self` too (the `#[instrument(skip(self))]` habit).
    let idents = Punctuated::<Ident, Token![,]>::parse_terminated_with(
        &content,
        syn::ext::IdentExt::parse_any,
    )?;
    set(&mut args.skip, name, idents.into_iter().collect())
}

fn parse_fingerprint(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let expr: Expr = input.parse()?;
    let value = match &expr {
            Expr::Lit(ExprLit { lit: Lit::Bool(b), .. }) if !b.value => FingerprintArg::Off(b.span),
            Expr::Lit(ExprLit { lit: Lit::Bool(b), .. }) => {
                return Err(syn::Error::new(
                    b.span,
                    "`fingerprint = true` is the default: remove it, or give `fingerprint = false` or an expression",
                ))
            }
            _ => FingerprintArg::Expr(Box::new(expr)),
        };
    set(&mut args.fingerprint, name, value)
}

fn parse_on_conflict(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let lit: LitStr = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            "expected `on_conflict = \"reject\"` or `on_conflict = \"wait\"`",
        )
    })?;
    let value = match lit.value().as_str() {
            "reject" => Conflict::Reject,
            "wait" => Conflict::Wait,
            other => {
                return Err(syn::Error::new(
                    lit.span(),
                    format!("unknown `on_conflict` value \"{other}\": expected \"reject\" (fail with `Error::InFlight`) or \"wait\" (wait for the result)"),
                ))
            }
        };
    set(&mut args.on_conflict, name, value)
}

fn parse_wait(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let value = parse_duration(input, name.text)?;
    set(&mut args.wait, name, value)
}

fn parse_cache_errors(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let value = if input.peek(syn::LitBool) {
        input
            .parse::<syn::LitBool>()?
            .value
            .then_some(CacheErrors::All)
    } else {
        let path: Path = input.parse().map_err(|e| {
                syn::Error::new(e.span(), "expected `cache_errors = true` or `cache_errors = path::to::predicate` (a `fn(&E) -> bool`)")
            })?;
        Some(CacheErrors::When(path))
    };
    set(&mut args.cache_errors, name, value)
}

fn parse_on_replay(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let expected = "expected `on_replay = path::to::hook`: the path of a function `fn(T, &idempotency::ReplayInfo) -> T` that adjusts a replayed value (`T` is the `Ok` type of the function)";
    // A path and nothing else: a closure or a call would be evaluated per call, and a literal
    // names nothing.
    let expr: Expr = input
        .parse()
        .map_err(|e| syn::Error::new(e.span(), expected))?;
    match expr {
        Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => {
            set(&mut args.on_replay, name, p.path)
        }
        other => Err(syn::Error::new(other.span(), expected)),
    }
}

fn parse_max_record_bytes(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let expr: Expr = input.parse()?;
    if let Expr::Lit(ExprLit { lit, .. }) = &expr {
        let ok = matches!(lit, Lit::Int(i) if i.base10_parse::<u64>().is_ok_and(|n| n > 0));
        if !ok {
            return Err(syn::Error::new(
                    lit.span(),
                    "`max_record_bytes` must be a number of bytes greater than zero, e.g. `max_record_bytes = 1_048_576`",
                ));
        }
    }
    set(&mut args.max_record_bytes, name, expr)
}

fn parse_on_unknown(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let expected = "expected `on_unknown = \"refuse\"` (at most once: a started body whose outcome is unknown is not run again for the key) or `on_unknown = \"rerun\"` (at least once: a retry runs it again)";
    let lit: LitStr = input
        .parse()
        .map_err(|e| syn::Error::new(e.span(), expected))?;
    let value = match lit.value().as_str() {
        "refuse" => Unknown::Refuse,
        "rerun" => Unknown::Rerun,
        _ => return Err(syn::Error::new(lit.span(), expected)),
    };
    set(&mut args.on_unknown, name, value)
}

fn parse_recovery(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let value = parse_duration(input, name.text)?;
    set(&mut args.recovery, name, value)
}

fn parse_detach(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let lit: syn::LitBool = input
        .parse()
        .map_err(|e| syn::Error::new(e.span(), "expected `detach = true` or `detach = false`"))?;
    set(&mut args.detach, name, lit)
}

fn parse_name(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let lit: LitStr = input.parse().map_err(|e| {
            syn::Error::new(e.span(), "expected `name = \"...\"`: a string literal naming what the function does, e.g. `name = \"billing.charge\"`")
        })?;
    let value = lit.value();
    let problem = if value.is_empty() {
        Some("is empty")
    } else if value.len() > 255 {
        Some("is longer than 255 bytes")
    } else if value.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(syn::Error::new(
                lit.span(),
                format!("the operation name {problem}: give a short stable name such as `name = \"billing.charge\"`"),
            ));
    }
    set(&mut args.name, name, lit)
}

fn parse_version(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let lit: syn::LitInt = input.parse().map_err(|e| {
            syn::Error::new(e.span(), "expected `version = N`: a whole number (0 to 4294967295) you raise when the result type changes incompatibly")
        })?;
    if lit.base10_parse::<u32>().is_err() {
        return Err(syn::Error::new(
            lit.span(),
            "`version` must be a whole number from 0 to 4294967295",
        ));
    }
    set(&mut args.version, name, lit)
}

fn parse_krate(args: &mut Args, name: Name, input: ParseStream) -> syn::Result<()> {
    input.parse::<Token![=]>()?;
    let path: Path = input.parse().map_err(|e| {
            syn::Error::new(e.span(), "expected `crate = path`, the path of the `idempotency` crate as your Cargo.toml renames it, e.g. `crate = ::payments_idem`")
        })?;
    set(&mut args.krate, name, path)
}

/// `"24h"`-style strings and integer seconds are checked here; other expressions at run time.
fn parse_duration(input: ParseStream, what: &str) -> syn::Result<DurationArg> {
    let expr: Expr = input.parse()?;
    let millis = match &expr {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => parse_millis(&s.value()).map_err(|why| {
            syn::Error::new(
                s.span(),
                format!("`{what}` is not a duration ({why}): write e.g. \"30s\", \"15m\", \"24h\", \"7d\" or \"1h30m\""),
            )
        })?,
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i
            .base10_parse::<u64>()
            .map_err(|e| syn::Error::new(i.span(), format!("`{what}` in seconds must be a whole number: {e}")))?
            .checked_mul(1000)
            .ok_or_else(|| syn::Error::new(i.span(), format!("`{what}` is too large")))?,
        Expr::Lit(other) => {
            return Err(syn::Error::new(
                other.span(),
                format!("`{what}` must be a duration string such as \"24h\", a number of seconds, or an expression giving a `std::time::Duration`"),
            ))
        }
        _ => return Ok(DurationArg::Expr(Box::new(expr))),
    };
    if millis == 0 {
        return Err(syn::Error::new(
            expr.span(),
            format!("`{what}` must be greater than zero: a zero {what} would keep nothing"),
        ));
    }
    Ok(DurationArg::Millis(millis))
}

/// Parses the attribute's token stream.
pub fn parse(tokens: TokenStream) -> syn::Result<Args> {
    syn::parse2(tokens)
}
