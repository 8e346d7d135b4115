//! The rustls crypto provider of the Redis and PostgreSQL stores' TLS connections.
//!
//! idem passes its provider to rustls explicitly (`ClientConfig::builder_with_provider`) and
//! never installs one as the process's default, so an application stays free to install its
//! own with `CryptoProvider::install_default` before or after it connects a store. The
//! provider is:
//!
//! 1. the process's default, if the application installed one (a FIPS build, say);
//! 2. else aws-lc-rs, with the `tls-aws-lc-rs` feature (it wins when both features are on:
//!    `tls-ring` is a default feature, so a build that adds `tls-aws-lc-rs` asked for it);
//! 3. else ring, with the `tls-ring` feature (the default);
//! 4. else none: a TLS connection is refused with [`Error::Config`].
//!
//! One exception, forced by the `redis` crate: it builds its own rustls configuration for
//! `rediss://` with `ClientConfig::builder()`, which needs a process default and installs the
//! one rustls' features name if there is none. So before the first `rediss://` connection the
//! Redis store installs the provider above as the default, unless the application has done so;
//! see [`RedisStore`](super::redis::RedisStore)'s module docs.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

use crate::error::{Error, Result};

/// The provider of idem's TLS connections (see the [module docs](self)); never installed.
pub(crate) fn crypto_provider() -> Result<Arc<CryptoProvider>> {
    if let Some(installed) = CryptoProvider::get_default() {
        return Ok(installed.clone());
    }
    feature_provider().map(Arc::new).ok_or_else(|| {
        Error::config(
            "TLS needs a rustls crypto provider: enable the `tls-ring` or `tls-aws-lc-rs` feature of idempotency, or install one with rustls::crypto::CryptoProvider::install_default before connecting",
        )
    })
}

/// Makes sure rustls has a process default provider, for the `redis` crate's `rediss://`
/// connections (see the [module docs](self)): the application's, if it installed one, else
/// the one [`crypto_provider`] would choose, installed. The one place idem installs a default.
#[cfg(feature = "redis")]
pub(crate) fn install_for_redis() -> Result<()> {
    if CryptoProvider::get_default().is_some() {
        return Ok(());
    }
    let provider = crypto_provider()?;
    // Another thread may have installed one in between: either way there is one now.
    let _ = Arc::unwrap_or_clone(provider).install_default();
    Ok(())
}

/// The provider the cargo features choose: aws-lc-rs, else ring, else none.
fn feature_provider() -> Option<CryptoProvider> {
    #[cfg(feature = "tls-aws-lc-rs")]
    return Some(rustls::crypto::aws_lc_rs::default_provider());
    #[cfg(all(feature = "tls-ring", not(feature = "tls-aws-lc-rs")))]
    return Some(rustls::crypto::ring::default_provider());
    #[cfg(not(any(feature = "tls-ring", feature = "tls-aws-lc-rs")))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `provider` offers the post-quantum key exchange that aws-lc-rs has and ring has
    /// not, which tells the two apart.
    fn has_mlkem(provider: &CryptoProvider) -> bool {
        provider
            .kx_groups
            .iter()
            .any(|g| format!("{:?}", g.name()).contains("MLKEM"))
    }

    #[test]
    fn the_features_choose_the_provider() {
        let provider = feature_provider();
        #[cfg(feature = "tls-aws-lc-rs")]
        assert!(has_mlkem(&provider.expect("aws-lc-rs")), "aws-lc-rs wins");
        #[cfg(all(feature = "tls-ring", not(feature = "tls-aws-lc-rs")))]
        assert!(!has_mlkem(&provider.expect("ring")), "ring");
        #[cfg(not(any(feature = "tls-ring", feature = "tls-aws-lc-rs")))]
        assert!(provider.is_none());
    }
}
