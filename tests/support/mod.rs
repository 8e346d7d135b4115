//! Types shared by the integration tests.
#![allow(dead_code)]

use serde::{Deserialize, Serialize};

/// The error type of the test functions: idem's errors, or the body's own.
#[derive(Debug, Serialize, Deserialize)]
pub enum AppError {
    #[serde(skip)]
    Idem(idempotency::Error),
    Declined(String),
    Transient(String),
}

impl From<idempotency::Error> for AppError {
    fn from(e: idempotency::Error) -> Self {
        AppError::Idem(e)
    }
}

impl AppError {
    /// The idem error inside, if this is one.
    pub fn idem(&self) -> Option<&idempotency::Error> {
        match self {
            AppError::Idem(e) => Some(e),
            _ => None,
        }
    }
}
