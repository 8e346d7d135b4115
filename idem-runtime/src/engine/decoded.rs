//! Replaying decoded values: a replay of a record this process has already decoded clones the
//! value it decoded then, instead of decoding the record's JSON again.
//!
//! Only for result types that are `Clone + Send + Sync + 'static`, chosen where the type is
//! known (the `#[idempotent]` expansion asks [`Probe`]); every other type is decoded each
//! time. Sound because the value kept is the one decoded from the very bytes the store gave:
//! an entry is used only for a record equal byte for byte to the one it was decoded from
//! (same storage key, same operation and schema version), so a replay equals what decoding
//! would give, the first result as stored. A type whose `Clone` shares state (an
//! `Arc<Mutex<_>>` inside) then shares it between the replays of this process.
//!
//! The table is small and fixed: [`SLOTS`] entries, each a lock and the last record decoded
//! into it (records up to [`MAX_RECORD`] bytes). A key maps to one slot; two keys that share it
//! take turns.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::Mutex;

use bytes::Bytes;

use crate::key::StorageKey;
use crate::record::Expected;

/// How many decoded values a process keeps.
pub const SLOTS: usize = 4096;

/// The largest record whose decoded value is kept (larger ones are decoded each time).
pub const MAX_RECORD: usize = 8 * 1024;

struct Slot {
    key: StorageKey,
    record: Bytes,
    operation: Option<&'static str>,
    version: u32,
    token: u64,
    completed_at_ms: u64,
    value: Box<dyn Any + Send + Sync>,
}

static TABLE: [Mutex<Option<Slot>>; SLOTS] = [const { Mutex::new(None) }; SLOTS];

fn slot(key: &StorageKey) -> &'static Mutex<Option<Slot>> {
    // The key is the hex of a SHA-256 digest: its first characters are uniform.
    let hex = key.as_str().as_bytes();
    let nibble = |c: u8| (c as char).to_digit(16).unwrap_or(0) as usize;
    let index = (nibble(hex[0]) << 8) | (nibble(hex[1]) << 4) | nibble(hex[2]);
    &TABLE[index % SLOTS]
}

/// A value replayed from the table, with what is known of its record.
pub(crate) struct Replayed<T> {
    pub(crate) value: T,
    pub(crate) token: u64,
    pub(crate) completed_at_ms: u64,
}

/// How a result type `T` is replayed from decoded values: given by [`Probe`] for types that
/// can be, absent for the others.
pub struct Replayer<T> {
    pub(crate) get: fn(&StorageKey, &Bytes, &Expected<'static>) -> Option<Replayed<T>>,
    pub(crate) put: fn(&StorageKey, &Bytes, &Expected<'static>, u64, u64, &T),
}

impl<T: Clone + Send + Sync + 'static> Replayer<T> {
    /// The replayer of a type known to be `Clone` (the engine's own callers).
    pub(crate) fn cloning() -> Self {
        Replayer {
            get: get::<T>,
            put: put::<T>,
        }
    }
}

impl<T> Clone for Replayer<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Replayer<T> {}

fn get<T: Clone + Send + Sync + 'static>(
    key: &StorageKey,
    record: &Bytes,
    expect: &Expected<'static>,
) -> Option<Replayed<T>> {
    let slot = slot(key).lock().unwrap_or_else(|p| p.into_inner());
    let kept = slot.as_ref()?;
    let same = kept.key == *key
        && kept.operation == expect.operation
        && kept.version == expect.result_version
        && (kept.record.as_ptr() == record.as_ptr() && kept.record.len() == record.len()
            || kept.record == *record);
    if !same {
        return None;
    }
    let value = kept.value.downcast_ref::<T>()?.clone();
    Some(Replayed {
        value,
        token: kept.token,
        completed_at_ms: kept.completed_at_ms,
    })
}

fn put<T: Clone + Send + Sync + 'static>(
    key: &StorageKey,
    record: &Bytes,
    expect: &Expected<'static>,
    token: u64,
    completed_at_ms: u64,
    value: &T,
) {
    if record.len() > MAX_RECORD {
        return;
    }
    let entry = Slot {
        key: key.clone(),
        record: record.clone(),
        operation: expect.operation,
        version: expect.result_version,
        token,
        completed_at_ms,
        value: Box::new(value.clone()),
    };
    let old = slot(key)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(entry);
    drop(old);
}

/// Finds the [`Replayer`] of a result type where the type is known, by autoref
/// specialization: `(&&Probe::<R>::new()).replayer()` is `Some` when `R`'s `Ok` type is
/// `Clone + Send + Sync + 'static` (through [`ViaClone`]), else `None` (through
/// [`ViaDecode`]). For the `#[idempotent]` expansion.
pub struct Probe<R>(PhantomData<fn() -> R>);

impl<R> Probe<R> {
    /// The probe of `R`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Probe(PhantomData)
    }
}

/// The [`Probe`] of a result whose `Ok` type can be cloned: replays clone a decoded value.
pub trait ViaClone<T> {
    /// `Some`: replays of this type clone decoded values.
    fn replayer(&self) -> Option<Replayer<T>>;
}

impl<T, E> ViaClone<T> for &Probe<Result<T, E>>
where
    T: Clone + Send + Sync + 'static,
{
    fn replayer(&self) -> Option<Replayer<T>> {
        Some(Replayer::cloning())
    }
}

/// The [`Probe`] of every other type: replays decode. Implemented for every type, so that a
/// return type that is not a `Result` is reported once, by `run`, not here too.
pub trait ViaDecode {
    /// [`Decoding`]: replays of this type decode the record.
    fn replayer(&self) -> Decoding;
}

impl<R> ViaDecode for Probe<R> {
    fn replayer(&self) -> Decoding {
        Decoding
    }
}

/// What [`ViaDecode`] finds: replays decode.
#[derive(Clone, Copy, Debug)]
pub struct Decoding;

/// What a [`Probe`] finds, as `run` takes it: a [`Replayer`] of `T`, or [`Decoding`].
pub trait IntoReplayer<T> {
    /// The replayer, if replays of `T` clone decoded values.
    fn into_replayer(self) -> Option<Replayer<T>>;
}

impl<T> IntoReplayer<T> for Decoding {
    fn into_replayer(self) -> Option<Replayer<T>> {
        None
    }
}

impl<T> IntoReplayer<T> for Option<Replayer<T>> {
    fn into_replayer(self) -> Option<Replayer<T>> {
        self
    }
}
