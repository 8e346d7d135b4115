//! How the layer scopes a request's key: per client (a principal function) or one named scope
//! shared by every client. There is no default: a layer is built with one or the other.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::request;

/// The principal function of [`IdempotencyLayer::per_client`](super::IdempotencyLayer::per_client).
pub(super) type PrincipalFn = dyn Fn(&request::Parts) -> Option<String> + Send + Sync;

/// The namespace of the keys of a layer's requests.
#[derive(Clone)]
pub(super) enum Scoping {
    /// Each client its own scope: the principal the function finds in the request.
    PerClient(Arc<PrincipalFn>),
    /// One scope, deliberately shared by every client.
    Shared(Arc<str>),
}

impl Scoping {
    /// The scope of a request, or `None` when the client cannot be identified: the function
    /// found no principal, or an empty one, or one with a NUL byte (which no scope may hold).
    pub(super) fn of(&self, parts: &request::Parts) -> Option<Cow<'_, str>> {
        match self {
            Scoping::PerClient(principal) => principal(parts)
                .filter(|p| !p.is_empty() && !p.contains('\0'))
                .map(Cow::Owned),
            Scoping::Shared(name) => Some(Cow::Borrowed(name)),
        }
    }

    /// A shared scope named `name`, or the mistake in the name (empty, or with a NUL byte).
    pub(super) fn shared(name: String) -> Result<Self, String> {
        if name.is_empty() {
            return Err("IdempotencyLayer::shared: the scope name is empty; name the shared scope, e.g. \"public-api\"".into());
        }
        if name.contains('\0') {
            return Err(format!(
                "IdempotencyLayer::shared: the scope name {name:?} contains a NUL byte"
            ));
        }
        Ok(Scoping::Shared(name.into()))
    }
}

impl fmt::Debug for Scoping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scoping::PerClient(_) => f.write_str("PerClient(..)"),
            Scoping::Shared(name) => f.debug_tuple("Shared").field(name).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(principal: Option<&str>) -> request::Parts {
        let mut builder = http::Request::post("/");
        if let Some(p) = principal {
            builder = builder.header("x-principal", p);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn per_client_refuses_missing_and_empty_principals() {
        let scoping = Scoping::PerClient(Arc::new(|parts: &request::Parts| {
            parts
                .headers
                .get("x-principal")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }));
        assert_eq!(scoping.of(&parts(Some("alice"))).as_deref(), Some("alice"));
        assert_eq!(scoping.of(&parts(None)), None);
        assert_eq!(scoping.of(&parts(Some(""))), None);
        let nul = Scoping::PerClient(Arc::new(|_: &request::Parts| Some("a\0b".to_owned())));
        assert_eq!(nul.of(&parts(None)), None);
    }

    #[test]
    fn shared_is_the_same_scope_for_everyone() {
        let scoping = Scoping::shared("public".into()).unwrap();
        assert_eq!(scoping.of(&parts(Some("alice"))).as_deref(), Some("public"));
        assert_eq!(scoping.of(&parts(None)).as_deref(), Some("public"));
    }

    #[test]
    fn shared_scope_needs_a_name() {
        let e = Scoping::shared(String::new()).expect_err("refused");
        assert!(e.contains("scope name is empty"), "{e}");
        assert!(Scoping::shared("a\0b".into()).is_err());
    }
}
