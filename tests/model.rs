//! A model check of the store state machine (design section 3): random sequences of claim,
//! complete, release, renew, get, purge, concurrent claim races and "advance time" steps, from
//! three callers over three keys, run against a store and against a small reference model. After
//! every step the store's answers must agree with the model:
//!
//! - `Acquired` only when the model says the key is free (never two holders at once; when all
//!   callers race for a free key, exactly one acquires), with a token greater than every earlier
//!   token of the key (and of the store, except Redis, whose tokens are ordered per key), and
//!   `takeover = true` exactly when it replaces an in-flight record, whatever that record's
//!   fingerprint;
//! - a lease only says when another caller may take the key over, not how long the claim lasts:
//!   an in-flight record stays its holder's until a claim takes it over (or it has been
//!   abandoned for `ABANDONED_CLAIM_RETENTION`, 24 h, never reached here). So `complete`,
//!   `release` and `renew` with exactly the token that holds the key in flight succeed whether
//!   or not its lease ran out (a late result lands and is replayed; a late renew makes the key
//!   `InFlight` to other callers again), `get` reports such a record as `InFlight` with that
//!   token, and `purge_expired` leaves it alone;
//! - `complete`/`release`/`renew` with any other token (taken over, released, completed, another
//!   key's, never issued) fail with `Error::LeaseLost` and change nothing;
//! - a completed record is returned byte-identical by `claim` and `get` until its ttl runs out,
//!   and never overwritten; then it is gone (a claim runs again, `get` finds nothing, and purge
//!   counts it unless the server expires records itself).
//!
//! Time: the memory store runs on tokio's paused clock, moved by `tokio::time::advance`, so its
//! expiry is exact. SQLite, Redis and PostgreSQL use real clocks, so the "advance" step really
//! sleeps, leases and ttls are short (250 ms and 650 ms), and every step is timed: the model knows
//! each deadline only as an interval (the store read its clock somewhere between the start and the
//! end of the step that set it). A deadline that is neither clearly ahead nor clearly past is
//! "unknown": the store may answer either way. Lease deadlines matter only to claims (take over,
//! or answer `InFlight`/`KeyReuse`); the holder's own `complete`, `renew` and `release` never
//! depend on them, so they are never ambiguous. A ttl deadline matters to claim, get and purge;
//! an answer that proves a completed record expired (a claim acquiring it, `get` finding
//! nothing) is followed by the model. Advances are whole multiples of 100 ms and the lease and
//! ttl end on half units, so unknown cases are rare; they are counted.
//!
//! The checks cannot pass vacuously: the memory run (given at least 256 cases) asserts that it
//! saw late completes replayed, late renews and releases, lapsed claims reported by `get`,
//! takeovers, and taken-over tokens refused; and `the_model_catches_broken_stores` runs the model
//! against memory stores with one rule broken each (among them the old protocol: refusing a
//! holder whose lease ran out, hiding or purging its record), each of which must fail it.
//!
//! Cases: `PROPTEST_CASES` sets the number of cases for every store; by default 512 for memory
//! (12 to 24 steps each) and 32 for the others (6 to 12 steps each, 15 to 25 s per backend).
//! Redis and PostgreSQL are skipped when unreachable unless `IDEM_REQUIRE_SERVICES=1`. One store
//! alone: name its test (`memory_store_follows_the_model`, ...).
//!
//! ```text
//! cargo test --all-features --test model -- --nocapture
//! PROPTEST_CASES=2000 cargo test --all-features --test model memory_store -- --nocapture
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_testkit::{Hooks, Intercept};
use idempotency::store::{Claim, FencingToken, RecordState, StoredRecord};
use idempotency::{Error, Fingerprint, StorageKey, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use tokio::time::Instant;

/// The step of "advance time": advances are 1, 3 or 7 units.
const UNIT: Duration = Duration::from_millis(100);
/// Leases and ttls end on half units, as far as possible from any sum of advances.
const LEASE: Duration = Duration::from_millis(250);
const TTL: Duration = Duration::from_millis(650);
const CALLERS: usize = 3;
const KEYS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Operations.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fp {
    None,
    A,
    B,
}

impl Fp {
    fn get(self) -> Option<Fingerprint> {
        match self {
            Fp::None => None,
            Fp::A => Some(Fingerprint([0xa; 32])),
            Fp::B => Some(Fingerprint([0xb; 32])),
        }
    }
}

/// Which token a caller presents to complete, release or renew.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pick {
    /// The caller's own: the key and token of its last acquisition not yet completed or
    /// released (maybe lost to a takeover since); without one, the last token it got for the
    /// op's key, or a never-issued one.
    Own,
    /// The last token issued for another key.
    Foreign,
    /// A token the store never issues.
    Bogus(u8),
}

#[derive(Clone, Debug)]
enum Op {
    Claim {
        caller: usize,
        key: usize,
        fp: Fp,
    },
    /// Every caller claims the key at once.
    Race {
        key: usize,
        fp: Fp,
    },
    Complete {
        caller: usize,
        key: usize,
        pick: Pick,
        payload: Vec<u8>,
    },
    Release {
        caller: usize,
        key: usize,
        pick: Pick,
    },
    Renew {
        caller: usize,
        key: usize,
        pick: Pick,
    },
    Get {
        key: usize,
    },
    Purge,
    Advance {
        units: u32,
    },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Claim { .. } => "claim",
            Op::Race { .. } => "race",
            Op::Complete { .. } => "complete",
            Op::Release { .. } => "release",
            Op::Renew { .. } => "renew",
            Op::Get { .. } => "get",
            Op::Purge => "purge",
            Op::Advance { .. } => "advance",
        }
    }

    /// The op without its payload: what makes an interleaving.
    fn shape(&self) -> String {
        match self {
            Op::Complete {
                caller, key, pick, ..
            } => format!("complete{caller}{key}{pick:?}"),
            other => format!("{other:?}"),
        }
    }
}

fn ops(max_len: usize) -> impl Strategy<Value = Vec<Op>> {
    let caller = 0..CALLERS;
    let key = 0..KEYS;
    let fp = prop_oneof![1 => Just(Fp::None), 6 => Just(Fp::A), 1 => Just(Fp::B)];
    let pick = prop_oneof![8 => Just(Pick::Own), 1 => Just(Pick::Foreign), 1 => (0u8..4).prop_map(Pick::Bogus)];
    let op = prop_oneof![
        6 => (caller.clone(), key.clone(), fp.clone()).prop_map(|(caller, key, fp)| Op::Claim { caller, key, fp }),
        1 => (key.clone(), fp).prop_map(|(key, fp)| Op::Race { key, fp }),
        4 => (caller.clone(), key.clone(), pick.clone(), prop::collection::vec(any::<u8>(), 0..48))
            .prop_map(|(caller, key, pick, payload)| Op::Complete { caller, key, pick, payload }),
        2 => (caller.clone(), key.clone(), pick.clone()).prop_map(|(caller, key, pick)| Op::Release { caller, key, pick }),
        2 => (caller, key.clone(), pick).prop_map(|(caller, key, pick)| Op::Renew { caller, key, pick }),
        2 => key.prop_map(|key| Op::Get { key }),
        1 => Just(Op::Purge),
        3 => prop_oneof![3 => Just(1u32), 2 => Just(3), 1 => Just(7)].prop_map(|units| Op::Advance { units }),
    ];
    prop::collection::vec(op, max_len / 2..=max_len)
}

// ---------------------------------------------------------------------------------------------
// The reference model.

/// A deadline known to lie in `[lo, hi]` of the model's clock.
#[derive(Clone, Copy, Debug)]
struct Deadline {
    lo: Instant,
    hi: Instant,
}

#[derive(Clone, Debug)]
enum Slot {
    /// No record: never claimed, released, or a completed record purged. The next acquire is
    /// no takeover.
    Absent,
    /// In flight under `token` until a claim takes it over, whether or not its lease ran out:
    /// the lease only decides whether a claim may take over. (It is never abandoned here: the
    /// retention is 24 h.)
    InFlight {
        token: u64,
        fp: Option<Fingerprint>,
        lease: Deadline,
    },
    Completed {
        token: u64,
        fp: Option<Fingerprint>,
        payload: Vec<u8>,
        until: Deadline,
        /// Completed by a holder whose lease had surely run out.
        late: bool,
        /// Proven expired by an answer of the store.
        dead: bool,
        /// A purge ran while its expiry was unknown: it may be gone.
        maybe_purged: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Live {
    Yes,
    No,
    Unknown,
}

fn fingerprints_match(stored: Option<Fingerprint>, given: Option<Fingerprint>) -> bool {
    match (stored, given) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// The answer a claim gets from a live record (in flight within its lease, or completed
/// within its ttl).
fn live_answer(slot: &Slot, fp: Option<Fingerprint>) -> Claim {
    match slot {
        Slot::InFlight { fp: stored, .. } | Slot::Completed { fp: stored, .. }
            if !fingerprints_match(*stored, fp) =>
        {
            Claim::KeyReuse
        }
        Slot::InFlight { .. } => Claim::InFlight,
        Slot::Completed { payload, .. } => Claim::Completed(payload.clone().into()),
        Slot::Absent => unreachable!("absent slots are not live"),
    }
}

#[derive(Default, Debug)]
struct Stats {
    cases: u64,
    ops: BTreeMap<&'static str, u64>,
    acquired: u64,
    takeovers: u64,
    /// Takeovers of a record with another fingerprint (never key reuse).
    takeovers_of_other_fp: u64,
    replays_checked: u64,
    /// Replays of results completed after their holder's lease had run out.
    late_replays_checked: u64,
    stale_refused: u64,
    /// Of those: tokens whose claim was taken over.
    taken_over_refused: u64,
    accepted: BTreeMap<&'static str, u64>,
    /// Accepted from the holder after its lease had surely run out, nobody having taken over.
    accepted_late: BTreeMap<&'static str, u64>,
    /// `get` answers `InFlight` for a claim whose lease had surely run out.
    lapsed_gets: u64,
    /// Purges that ran while some claim's lease had surely run out (and kept it).
    lapsed_purges: u64,
    key_reuses: u64,
    in_flight: u64,
    expired_seen: u64,
    unknown_resolved: u64,
    races_with_one_winner: u64,
    shapes: HashSet<u64>,
}

struct Harness<'a> {
    store: &'a dyn Store,
    keys: Vec<StorageKey>,
    paused: bool,
    margin: Duration,
    native_expiry: bool,
    /// See [`Backend::sweeps_expired`].
    sweeps_expired: bool,
    /// Tokens strictly increase across keys (all stores but Redis, whose fencing is per key).
    global_tokens: bool,
    slots: Vec<Slot>,
    /// Per caller, per key: the last token the caller acquired.
    held: Vec<HashMap<usize, u64>>,
    /// Per caller: the key and token of its last acquisition, until it completes or releases.
    jobs: Vec<Option<(usize, u64)>>,
    /// Every token issued, with its key.
    issued: Vec<(usize, u64)>,
    /// Tokens (with their key) whose claim was taken over.
    taken_over: HashSet<(usize, u64)>,
    max_token: Option<u64>,
    max_token_of_key: Vec<Option<u64>>,
    stats: Stats,
}

const BOGUS: [u64; 4] = [0, u64::MAX, 1 << 63, i64::MAX as u64];

fn err_name(e: &Error) -> String {
    format!("{e:?}")
}

impl<'a> Harness<'a> {
    fn new(store: &'a dyn Store, paused: bool, native_expiry: bool, global_tokens: bool) -> Self {
        let run = rand::random::<u64>();
        Harness {
            store,
            keys: (0..KEYS)
                .map(|k| StorageKey::derive("model", &format!("{run:016x}:{k}")).unwrap())
                .collect(),
            paused,
            // Rounding to milliseconds (SQLite, Redis) and the wall clock against the monotonic
            // one (SQLite): a few milliseconds at most over a case.
            margin: if paused {
                Duration::ZERO
            } else {
                Duration::from_millis(5)
            },
            native_expiry,
            sweeps_expired: false,
            global_tokens,
            slots: vec![Slot::Absent; KEYS],
            held: vec![HashMap::new(); CALLERS],
            jobs: vec![None; CALLERS],
            issued: Vec::new(),
            taken_over: HashSet::new(),
            max_token: None,
            max_token_of_key: vec![None; KEYS],
            stats: Stats::default(),
        }
    }

    /// Whether the record of `key` stands in a claim's way during `[s, e]`: an in-flight record
    /// within its lease, or a completed one within its ttl.
    fn liveness(&self, key: usize, s: Instant, e: Instant) -> Live {
        let until = match &self.slots[key] {
            Slot::Absent => return Live::No,
            Slot::Completed { dead: true, .. } => return Live::No,
            Slot::InFlight { lease: until, .. } | Slot::Completed { until, .. } => until,
        };
        if until.lo > e + self.margin {
            Live::Yes
        } else if until.hi + self.margin <= s {
            Live::No
        } else {
            Live::Unknown
        }
    }

    fn mark_dead(&mut self, key: usize) {
        if let Slot::Completed { dead, .. } = &mut self.slots[key] {
            *dead = true;
        }
    }

    /// The takeover flag an acquire of `key` must report: whether it replaces an in-flight
    /// record (which only a takeover removes here).
    fn expected_takeover(&self, key: usize) -> bool {
        matches!(self.slots[key], Slot::InFlight { .. })
    }

    /// Who presents which token for which key. `Own`: the caller's job, or if it has none the
    /// next caller's that has one (callers with work to finish act more often).
    fn target(&self, caller: usize, key: usize, pick: Pick) -> (usize, usize, u64) {
        if pick == Pick::Own {
            for c in (0..CALLERS).map(|i| (caller + i) % CALLERS) {
                if let Some((k, t)) = self.jobs[c] {
                    return (c, k, t);
                }
            }
        }
        (caller, key, self.token(caller, key, pick))
    }

    /// The caller is done with its job on `key` (completed or released it).
    fn done(&mut self, caller: usize, key: usize) {
        if self.jobs[caller].is_some_and(|(k, _)| k == key) {
            self.jobs[caller] = None;
        }
    }

    fn token(&self, caller: usize, key: usize, pick: Pick) -> u64 {
        let bogus = |i: u8| BOGUS[i as usize % BOGUS.len()];
        match pick {
            Pick::Own => self.held[caller].get(&key).copied().unwrap_or(bogus(0)),
            Pick::Foreign => self
                .issued
                .iter()
                .rev()
                .find(|(k, _)| *k != key)
                .map(|(_, t)| *t)
                .unwrap_or(bogus(1)),
            Pick::Bogus(i) => bogus(i),
        }
    }

    /// Whether `token` holds `key` in the model: in flight with that token, its lease live or
    /// not (nobody took over).
    fn holds(&self, key: usize, token: u64) -> bool {
        matches!(&self.slots[key], Slot::InFlight { token: t, .. } if *t == token)
    }

    fn acquired(
        &mut self,
        caller: usize,
        key: usize,
        token: u64,
        takeover: bool,
        fp: Option<Fingerprint>,
        (s, e): (Instant, Instant),
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            takeover,
            self.expected_takeover(key),
            "takeover flag of key {} (model {:?})",
            key,
            &self.slots[key]
        );
        if let Some(max) = self.max_token_of_key[key] {
            prop_assert!(
                token > max,
                "token {} of key {} not above its earlier {}",
                token,
                key,
                max
            );
        }
        if self.global_tokens {
            if let Some(max) = self.max_token {
                prop_assert!(
                    token > max,
                    "token {} not above the store's earlier {}",
                    token,
                    max
                );
            }
        }
        if let Slot::InFlight {
            token: old,
            fp: old_fp,
            ..
        } = self.slots[key]
        {
            self.taken_over.insert((key, old));
            if !fingerprints_match(old_fp, fp) {
                self.stats.takeovers_of_other_fp += 1;
            }
        }
        self.max_token = Some(self.max_token.map_or(token, |m| m.max(token)));
        self.max_token_of_key[key] = Some(token);
        self.issued.push((key, token));
        self.held[caller].insert(key, token);
        self.jobs[caller] = Some((key, token));
        self.stats.acquired += 1;
        self.stats.takeovers += u64::from(takeover);
        self.slots[key] = Slot::InFlight {
            token,
            fp,
            lease: Deadline {
                lo: s + LEASE,
                hi: e + LEASE,
            },
        };
        Ok(())
    }

    /// Counts a byte-for-byte replay of the completed record of `key`.
    fn replayed(&mut self, key: usize) {
        self.stats.replays_checked += 1;
        if matches!(self.slots[key], Slot::Completed { late: true, .. }) {
            self.stats.late_replays_checked += 1;
        }
    }

    /// Checks one claim's answer against the model and applies it.
    fn check_claim(
        &mut self,
        caller: usize,
        key: usize,
        fp: Option<Fingerprint>,
        got: idempotency::Result<Claim>,
        s: Instant,
        e: Instant,
    ) -> Result<(), TestCaseError> {
        let got = got.map_err(|e| TestCaseError::fail(format!("claim failed: {e:?}")))?;
        let live = self.liveness(key, s, e);
        match (&got, live) {
            (Claim::Acquired { token, takeover }, Live::No | Live::Unknown) => {
                if live == Live::Unknown {
                    self.stats.unknown_resolved += 1;
                }
                if !matches!(self.slots[key], Slot::Absent) {
                    self.stats.expired_seen += 1;
                }
                self.acquired(caller, key, token.0, *takeover, fp, (s, e))?;
            }
            (Claim::Acquired { .. }, Live::Yes) => {
                return Err(TestCaseError::fail(format!(
                    "two holders: key {key} acquired while the model has it live: {:?}",
                    self.slots[key]
                )))
            }
            (answer, Live::Yes | Live::Unknown) => {
                let want = live_answer(&self.slots[key], fp);
                prop_assert_eq!(answer, &want, "claim of key {} ({:?})", key, live);
                match answer {
                    Claim::Completed(_) => self.replayed(key),
                    Claim::KeyReuse => self.stats.key_reuses += 1,
                    _ => self.stats.in_flight += 1,
                }
            }
            (answer, Live::No) => {
                return Err(TestCaseError::fail(format!(
                    "key {key} should be free (model {:?}), claim answered {answer:?}",
                    self.slots[key]
                )))
            }
        }
        Ok(())
    }

    async fn timed<T>(&self, f: impl std::future::Future<Output = T>) -> (T, Instant, Instant) {
        let s = Instant::now();
        let out = f.await;
        (out, s, Instant::now())
    }

    /// A guarded step (complete, release, renew) with `token` on `key`: `Ok` exactly when the
    /// token holds the key in flight, whether or not its lease ran out (nobody took over); else
    /// `LeaseLost`. Returns whether the store accepted it, and whether the holder's lease had
    /// surely run out.
    fn check_guarded(
        &mut self,
        what: &'static str,
        key: usize,
        token: u64,
        got: &idempotency::Result<()>,
        s: Instant,
        e: Instant,
    ) -> Result<(bool, bool), TestCaseError> {
        let holder = self.holds(key, token);
        match got {
            Ok(()) => {
                prop_assert!(
                    holder,
                    "{} with token {} of key {} accepted, model {:?}",
                    what,
                    token,
                    key,
                    self.slots[key]
                );
                *self.stats.accepted.entry(what).or_default() += 1;
                let late = self.liveness(key, s, e) == Live::No;
                if late {
                    *self.stats.accepted_late.entry(what).or_default() += 1;
                }
                Ok((true, late))
            }
            Err(Error::LeaseLost { .. }) => {
                prop_assert!(
                    !holder,
                    "{} by the holder {} of key {} refused (lease {:?}, nobody took over): {:?}",
                    what,
                    token,
                    key,
                    self.liveness(key, s, e),
                    self.slots[key]
                );
                self.stats.stale_refused += 1;
                if self.taken_over.contains(&(key, token)) {
                    self.stats.taken_over_refused += 1;
                }
                Ok((false, false))
            }
            Err(other) => Err(TestCaseError::fail(format!(
                "{what} failed: {}",
                err_name(other)
            ))),
        }
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        *self.stats.ops.entry(op.name()).or_default() += 1;
        let store = self.store;
        match op {
            Op::Claim { caller, key, fp } => {
                let fp = fp.get();
                let (got, s, e) = self
                    .timed(store.claim(&self.keys[*key], fp.as_ref(), LEASE))
                    .await;
                self.check_claim(*caller, *key, fp, got, s, e)?;
            }
            Op::Race { key, fp } => {
                let fp = fp.get();
                let k = &self.keys[*key];
                let claims = (0..CALLERS).map(|_| store.claim(k, fp.as_ref(), LEASE));
                let (got, s, e) = self.timed(futures::future::join_all(claims)).await;
                let got: Vec<Claim> = got
                    .into_iter()
                    .collect::<idempotency::Result<_>>()
                    .map_err(|e| TestCaseError::fail(format!("claim failed: {e:?}")))?;
                let winners: Vec<usize> = (0..CALLERS)
                    .filter(|&c| matches!(got[c], Claim::Acquired { .. }))
                    .collect();
                let live = self.liveness(*key, s, e);
                prop_assert!(winners.len() <= 1, "two holders in a race: {:?}", got);
                match live {
                    Live::No => prop_assert_eq!(
                        winners.len(),
                        1,
                        "a free key raced: one must win: {:?}",
                        got
                    ),
                    Live::Yes => prop_assert_eq!(winners.len(), 0, "a live key raced: {:?}", got),
                    Live::Unknown => {}
                }
                let old = (live != Live::No).then(|| live_answer(&self.slots[*key], fp));
                for (c, answer) in got.iter().enumerate() {
                    if winners.contains(&c) {
                        continue;
                    }
                    let ok = Some(answer) == old.as_ref()
                        || (!winners.is_empty() && *answer == Claim::InFlight);
                    prop_assert!(
                        ok,
                        "race on key {}: {:?}, model {:?} ({:?})",
                        key,
                        got,
                        self.slots[*key],
                        live
                    );
                }
                if let [winner] = winners[..] {
                    if live == Live::Unknown {
                        self.stats.unknown_resolved += 1;
                    }
                    self.stats.races_with_one_winner += 1;
                    let Claim::Acquired { token, takeover } = got[winner] else {
                        unreachable!()
                    };
                    self.acquired(winner, *key, token.0, takeover, fp, (s, e))?;
                }
            }
            Op::Complete {
                caller,
                key,
                pick,
                payload,
            } => {
                let (caller, key, token) = &self.target(*caller, *key, *pick);
                let (got, s, e) = self
                    .timed(store.complete(&self.keys[*key], FencingToken(*token), payload, TTL))
                    .await;
                let (accepted, late) = self.check_guarded("complete", *key, *token, &got, s, e)?;
                if accepted {
                    self.done(*caller, *key);
                    let Slot::InFlight { fp, .. } = self.slots[*key] else {
                        unreachable!("checked: in flight")
                    };
                    self.slots[*key] = Slot::Completed {
                        token: *token,
                        fp,
                        payload: payload.clone(),
                        until: Deadline {
                            lo: s + TTL,
                            hi: e + TTL,
                        },
                        late,
                        dead: false,
                        maybe_purged: false,
                    };
                }
            }
            Op::Release { caller, key, pick } => {
                let (caller, key, token) = &self.target(*caller, *key, *pick);
                let (got, s, e) = self
                    .timed(store.release(&self.keys[*key], FencingToken(*token)))
                    .await;
                if self.check_guarded("release", *key, *token, &got, s, e)?.0 {
                    self.done(*caller, *key);
                    self.slots[*key] = Slot::Absent;
                }
            }
            Op::Renew { caller, key, pick } => {
                let (_, key, token) = &self.target(*caller, *key, *pick);
                let (got, s, e) = self
                    .timed(store.renew(&self.keys[*key], FencingToken(*token), LEASE))
                    .await;
                if self.check_guarded("renew", *key, *token, &got, s, e)?.0 {
                    // A new lease from now, also when the old one had run out.
                    if let Slot::InFlight { lease, .. } = &mut self.slots[*key] {
                        *lease = Deadline {
                            lo: s + LEASE,
                            hi: e + LEASE,
                        };
                    }
                }
            }
            Op::Get { key } => {
                let (got, s, e) = self.timed(store.get(&self.keys[*key])).await;
                let got = got.map_err(|e| TestCaseError::fail(format!("get failed: {e:?}")))?;
                let live = self.liveness(*key, s, e);
                match (&self.slots[*key], got) {
                    (Slot::Absent, None) => {}
                    (Slot::Absent, Some(record)) => {
                        return Err(TestCaseError::fail(format!(
                            "get of key {key} found {record:?}, model says absent"
                        )))
                    }
                    // In flight, lease live or not: the record is there until a takeover.
                    (Slot::InFlight { token, fp, .. }, record) => {
                        let want = StoredRecord {
                            fingerprint: *fp,
                            state: RecordState::InFlight {
                                token: FencingToken(*token),
                            },
                        };
                        prop_assert_eq!(
                            record,
                            Some(want),
                            "get of key {} in flight (lease {:?})",
                            key,
                            live
                        );
                        if live == Live::No {
                            self.stats.lapsed_gets += 1;
                        }
                    }
                    (Slot::Completed { .. }, None) => match live {
                        Live::No => {}
                        Live::Unknown => {
                            self.stats.unknown_resolved += 1;
                            self.mark_dead(*key);
                        }
                        Live::Yes => {
                            return Err(TestCaseError::fail(format!(
                                "get lost the live record of key {key}: {:?}",
                                self.slots[*key]
                            )))
                        }
                    },
                    (
                        Slot::Completed {
                            token, fp, payload, ..
                        },
                        Some(record),
                    ) => {
                        prop_assert!(
                            live != Live::No,
                            "get of key {} found {:?}, model says expired: {:?}",
                            key,
                            record,
                            self.slots[*key]
                        );
                        let want = StoredRecord {
                            fingerprint: *fp,
                            state: RecordState::Completed {
                                token: FencingToken(*token),
                                record: payload.clone().into(),
                            },
                        };
                        prop_assert_eq!(record, want, "get of key {} completed", key);
                        self.replayed(*key);
                    }
                }
            }
            Op::Purge => {
                let (got, s, e) = self.timed(store.purge_expired()).await;
                let removed =
                    got.map_err(|e| TestCaseError::fail(format!("purge failed: {e:?}")))?;
                // Only completed records past their ttl go; in-flight ones stay, lease run out
                // or not (none is abandoned for the retention here).
                let (mut sure, mut maybe) = (0, 0);
                let mut lapsed = false;
                for key in 0..KEYS {
                    let live = self.liveness(key, s, e);
                    match &self.slots[key] {
                        Slot::Absent => {}
                        Slot::InFlight { .. } => lapsed |= live == Live::No,
                        Slot::Completed { maybe_purged, .. } => match live {
                            Live::No if !maybe_purged && !self.sweeps_expired => sure += 1,
                            Live::No | Live::Unknown => maybe += 1,
                            Live::Yes => {}
                        },
                    }
                }
                self.stats.lapsed_purges += u64::from(lapsed);
                if self.native_expiry {
                    prop_assert_eq!(removed, 0, "a store with native expiry purges nothing");
                } else {
                    prop_assert!(
                        (sure..=sure + maybe).contains(&removed),
                        "purge removed {}, expected {} to {} (model {:?})",
                        removed,
                        sure,
                        sure + maybe,
                        self.slots
                    );
                    for key in 0..KEYS {
                        let live = self.liveness(key, s, e);
                        match &mut self.slots[key] {
                            Slot::Completed { .. } if live == Live::No => {
                                self.slots[key] = Slot::Absent;
                            }
                            Slot::Completed { maybe_purged, .. } if live == Live::Unknown => {
                                *maybe_purged = true;
                            }
                            _ => {}
                        }
                    }
                }
            }
            Op::Advance { units } => {
                let d = UNIT * *units;
                if self.paused {
                    tokio::time::advance(d).await;
                } else {
                    tokio::time::sleep(d).await;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Running the model against each backend.

struct Backend {
    name: &'static str,
    paused: bool,
    native_expiry: bool,
    /// The store removes expired records by itself now and then (the memory store sweeps a
    /// few on each new claim), so a purge may find fewer than the model expects.
    sweeps_expired: bool,
    global_tokens: bool,
    default_cases: u32,
    max_ops: usize,
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(b: &Backend) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(b.default_cases),
        // Real-time backends sleep: keep shrinking short.
        max_shrink_iters: if b.paused { 1024 } else { 64 },
        failure_persistence: None,
        ..Config::default()
    })
}

async fn run_case(
    b: &Backend,
    store: &dyn Store,
    ops: &[Op],
    totals: &Mutex<Stats>,
) -> Result<(), TestCaseError> {
    let mut h = Harness::new(store, b.paused, b.native_expiry, b.global_tokens);
    h.sweeps_expired = b.sweeps_expired;
    let mut hasher = DefaultHasher::new();
    for (i, op) in ops.iter().enumerate() {
        op.shape().hash(&mut hasher);
        h.step(op)
            .await
            .map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {e}\nops: {ops:#?}")))?;
    }
    let mut t = totals.lock().unwrap();
    t.cases += 1;
    add_counts(&mut t.ops, h.stats.ops);
    t.acquired += h.stats.acquired;
    t.takeovers += h.stats.takeovers;
    t.takeovers_of_other_fp += h.stats.takeovers_of_other_fp;
    t.replays_checked += h.stats.replays_checked;
    t.late_replays_checked += h.stats.late_replays_checked;
    t.stale_refused += h.stats.stale_refused;
    t.taken_over_refused += h.stats.taken_over_refused;
    add_counts(&mut t.accepted, h.stats.accepted);
    add_counts(&mut t.accepted_late, h.stats.accepted_late);
    t.lapsed_gets += h.stats.lapsed_gets;
    t.lapsed_purges += h.stats.lapsed_purges;
    t.key_reuses += h.stats.key_reuses;
    t.in_flight += h.stats.in_flight;
    t.expired_seen += h.stats.expired_seen;
    t.unknown_resolved += h.stats.unknown_resolved;
    t.races_with_one_winner += h.stats.races_with_one_winner;
    t.shapes.insert(hasher.finish());
    Ok(())
}

/// Adds the counts of `from` to those of `into`, name by name.
fn add_counts(into: &mut BTreeMap<&'static str, u64>, from: BTreeMap<&'static str, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

fn report(name: &str, t: &Stats) {
    let total: u64 = t.ops.values().sum();
    eprintln!(
        "model[{name}]: {} cases, {total} operations {:?}, {} distinct interleavings; \
         {} acquisitions ({} takeovers, {} of them of another fingerprint, {} races with one winner), \
         accepted {:?}, of them after the holder's lease ran out {:?}, \
         {} stale tokens refused ({} of them taken over), \
         {} replays checked byte for byte ({} of late results), {} gets of lapsed claims, \
         {} purges that kept lapsed claims, {} in-flight and {} key-reuse answers, \
         {} expiries observed, {} unknown deadlines resolved by the store; \
         duplicate holders found: 0, lost or overwritten results: 0",
        t.cases,
        t.ops,
        t.shapes.len(),
        t.acquired,
        t.takeovers,
        t.takeovers_of_other_fp,
        t.races_with_one_winner,
        t.accepted,
        t.accepted_late,
        t.stale_refused,
        t.taken_over_refused,
        t.replays_checked,
        t.late_replays_checked,
        t.lapsed_gets,
        t.lapsed_purges,
        t.in_flight,
        t.key_reuses,
        t.expired_seen,
        t.unknown_resolved,
    );
}

/// Asserts that a run exercised every rule, so that no check passed vacuously.
fn assert_coverage(name: &str, t: &Stats) {
    let late = |what: &str| t.accepted_late.get(what).copied().unwrap_or(0);
    let seen = [
        ("takeovers", t.takeovers),
        ("takeovers of another fingerprint", t.takeovers_of_other_fp),
        ("races with one winner", t.races_with_one_winner),
        ("late completes", late("complete")),
        ("late renews", late("renew")),
        ("late releases", late("release")),
        ("replays of late results", t.late_replays_checked),
        ("gets of lapsed claims", t.lapsed_gets),
        ("purges that kept lapsed claims", t.lapsed_purges),
        ("taken-over tokens refused", t.taken_over_refused),
        ("in-flight answers", t.in_flight),
        ("key-reuse answers", t.key_reuses),
    ];
    for (what, n) in seen {
        assert!(n > 0, "model[{name}]: {} cases saw no {what}", t.cases);
    }
}

fn finish(
    name: &str,
    result: Result<(), proptest::test_runner::TestError<Vec<Op>>>,
    t: &Mutex<Stats>,
) {
    if let Err(e) = result {
        panic!("model check of the {name} store failed: {e}");
    }
    let t = t.lock().unwrap();
    assert!(t.cases > 0, "no case ran");
    report(name, &t);
}

/// Runs the model against stores made by `fresh` (one per case) on a real-time runtime.
#[cfg_attr(
    not(any(feature = "sqlite", feature = "redis", feature = "postgres")),
    allow(dead_code)
)]
fn check_real_time<S, F, Fut>(
    b: Backend,
    setup: impl std::future::Future<Output = Option<S>>,
    fresh: F,
) where
    F: Fn(&S) -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Some(shared) = rt.block_on(setup) else {
        return;
    };
    let totals = Mutex::new(Stats::default());
    let result = runner(&b).run(&ops(b.max_ops), |ops| {
        rt.block_on(async {
            let store = fresh(&shared).await;
            run_case(&b, &*store, &ops, &totals).await
        })
    });
    finish(b.name, result, &totals);
}

#[test]
fn memory_store_follows_the_model() {
    let b = Backend {
        name: "memory",
        paused: true,
        native_expiry: false,
        sweeps_expired: true,
        global_tokens: true,
        default_cases: 512,
        max_ops: 24,
    };
    let totals = Mutex::new(Stats::default());
    let result = runner(&b).run(&ops(b.max_ops), |ops| {
        // A paused clock: advancing is exact and instant.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let store = idempotency::MemoryStore::new();
            run_case(&b, &store, &ops, &totals).await
        })
    });
    finish(b.name, result, &totals);
    let t = totals.lock().unwrap();
    // Enough cases to see every rule at work (a few hundred almost surely do).
    if t.cases >= 256 {
        assert_coverage(b.name, &t);
    }
}

// ---------------------------------------------------------------------------------------------
// Broken stores: the model must catch each.

/// One rule a broken store gets wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    /// The old protocol: `complete`, `renew` and `release` of the holder are refused once its
    /// lease ran out, although nobody took over.
    RefuseLateHolder,
    /// A late `complete` answers `Ok`, but its result is lost (the claim is released instead).
    LoseLateResult,
    /// A late `renew` answers `Ok` but does not re-establish the lease.
    LateRenewIgnored,
    /// `get` hides an in-flight record whose lease ran out.
    HideLapsedClaim,
    /// `purge_expired` removes in-flight records whose lease ran out.
    PurgeLapsedClaim,
    /// A claim never takes over an in-flight record whose lease ran out (answers `InFlight`).
    NoTakeover,
    /// A takeover reports `takeover: false`.
    HideTakeover,
    /// The token of a taken-over claim may still complete (`Ok`, storing nothing).
    AcceptTakenOver,
}

impl Bug {
    const ALL: [Bug; 8] = [
        Bug::RefuseLateHolder,
        Bug::LoseLateResult,
        Bug::LateRenewIgnored,
        Bug::HideLapsedClaim,
        Bug::PurgeLapsedClaim,
        Bug::NoTakeover,
        Bug::HideTakeover,
        Bug::AcceptTakenOver,
    ];
}

/// A memory store with one [`Bug`], on the paused clock.
type Broken = Intercept<idempotency::MemoryStore, Bugged>;

fn broken(bug: Bug) -> Broken {
    Intercept::with_hooks(idempotency::MemoryStore::new(), Bugged::new(bug))
}

/// The hooks of [`Broken`]: the bug, and the claims made through it: per key, the token holding
/// it in flight and the end of its lease.
struct Bugged {
    bug: Bug,
    claims: Mutex<HashMap<StorageKey, (u64, Instant)>>,
    taken_over: Mutex<HashSet<(StorageKey, u64)>>,
}

impl Bugged {
    fn new(bug: Bug) -> Self {
        Bugged {
            bug,
            claims: Mutex::default(),
            taken_over: Mutex::default(),
        }
    }

    /// The token of the claim on `key` whose lease ran out, if any.
    fn lapsed(&self, key: &StorageKey) -> Option<u64> {
        let now = Instant::now();
        let claims = self.claims.lock().unwrap();
        claims
            .get(key)
            .filter(|(_, until)| *until <= now)
            .map(|(t, _)| *t)
    }

    /// Whether `token` holds `key` with its lease run out.
    fn late(&self, key: &StorageKey, token: FencingToken) -> bool {
        self.lapsed(key) == Some(token.0)
    }

    fn forget(&self, key: &StorageKey) {
        self.claims.lock().unwrap().remove(key);
    }
}

#[async_trait::async_trait]
impl Hooks for Bugged {
    fn backend(&self, _: &dyn Store) -> &'static str {
        "broken"
    }

    async fn claim(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> idempotency::Result<Claim> {
        if self.bug == Bug::NoTakeover && self.lapsed(key).is_some() {
            return Ok(Claim::InFlight);
        }
        let now = Instant::now();
        let got = inner.claim(key, fingerprint, lease).await?;
        if let Claim::Acquired { token, .. } = got {
            let old = self
                .claims
                .lock()
                .unwrap()
                .insert(key.clone(), (token.0, now + lease));
            if let Some((old, _)) = old {
                self.taken_over.lock().unwrap().insert((key.clone(), old));
            }
            if self.bug == Bug::HideTakeover {
                return Ok(Claim::Acquired {
                    token,
                    takeover: false,
                });
            }
        }
        Ok(got)
    }

    async fn complete(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        record: &[u8],
        ttl: Duration,
    ) -> idempotency::Result<()> {
        let late = self.late(key, token);
        match self.bug {
            Bug::RefuseLateHolder if late => return Err(Error::lease_lost(key)),
            Bug::LoseLateResult if late => {
                inner.release(key, token).await?;
                self.forget(key);
                return Ok(());
            }
            Bug::AcceptTakenOver
                if self
                    .taken_over
                    .lock()
                    .unwrap()
                    .contains(&(key.clone(), token.0)) =>
            {
                return Ok(())
            }
            _ => {}
        }
        inner.complete(key, token, record, ttl).await?;
        self.forget(key);
        Ok(())
    }

    async fn release(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
    ) -> idempotency::Result<()> {
        if self.bug == Bug::RefuseLateHolder && self.late(key, token) {
            return Err(Error::lease_lost(key));
        }
        inner.release(key, token).await?;
        self.forget(key);
        Ok(())
    }

    async fn renew(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
        token: FencingToken,
        lease: Duration,
    ) -> idempotency::Result<()> {
        let late = self.late(key, token);
        match self.bug {
            Bug::RefuseLateHolder if late => return Err(Error::lease_lost(key)),
            Bug::LateRenewIgnored if late => return Ok(()),
            _ => {}
        }
        let now = Instant::now();
        inner.renew(key, token, lease).await?;
        self.claims
            .lock()
            .unwrap()
            .insert(key.clone(), (token.0, now + lease));
        Ok(())
    }

    async fn get(
        &self,
        inner: &dyn Store,
        key: &StorageKey,
    ) -> idempotency::Result<Option<StoredRecord>> {
        let got = inner.get(key).await?;
        if self.bug == Bug::HideLapsedClaim {
            if let Some(RecordState::InFlight { token }) = got.as_ref().map(|r| &r.state) {
                if self.late(key, *token) {
                    return Ok(None);
                }
            }
        }
        Ok(got)
    }

    async fn purge_expired(&self, inner: &dyn Store) -> idempotency::Result<u64> {
        let mut removed = inner.purge_expired().await?;
        if self.bug == Bug::PurgeLapsedClaim {
            let keys: Vec<StorageKey> = self.claims.lock().unwrap().keys().cloned().collect();
            for key in keys {
                if let Some(token) = self.lapsed(&key) {
                    if inner.release(&key, FencingToken(token)).await.is_ok() {
                        self.forget(&key);
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }
}

#[test]
fn the_model_catches_broken_stores() {
    let b = Backend {
        name: "broken memory",
        paused: true,
        native_expiry: false,
        sweeps_expired: false,
        global_tokens: true,
        default_cases: 512,
        max_ops: 24,
    };
    for bug in Bug::ALL {
        let totals = Mutex::new(Stats::default());
        // At least as many cases as the memory check has by default, whatever PROPTEST_CASES.
        let cases = cases(b.default_cases).max(b.default_cases);
        let mut runner = TestRunner::new(Config {
            cases,
            ..runner(&b).config().clone()
        });
        let result = runner.run(&ops(b.max_ops), |ops| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let store = broken(bug);
                run_case(&b, &store, &ops, &totals).await
            })
        });
        match result {
            Err(TestError::Fail(why, ops)) => {
                let why = why.to_string();
                let why = why.lines().next().unwrap_or_default();
                eprintln!(
                    "model[broken: {bug:?}]: caught, shrunk to {} steps: {why}",
                    ops.len()
                );
            }
            Err(e) => panic!("model check of the store with {bug:?}: {e}"),
            Ok(()) => panic!("the model passed a store with {bug:?} in {cases} cases"),
        }
    }
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_store_follows_the_model() {
    use idempotency::SqliteStore;

    let dir = tempfile::tempdir().unwrap();
    let b = Backend {
        name: "sqlite",
        paused: false,
        native_expiry: false,
        sweeps_expired: false,
        global_tokens: true,
        default_cases: 32,
        max_ops: 12,
    };
    let n = std::sync::atomic::AtomicUsize::new(0);
    check_real_time(b, async { Some(()) }, |_| {
        let path = dir.path().join(format!(
            "model-{}.sqlite",
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        async move {
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(path).await.unwrap());
            store
        }
    });
}

#[cfg(feature = "redis")]
#[test]
fn redis_store_follows_the_model() {
    use idempotency::redis::redis;
    use idempotency::RedisStore;

    let url = idem_support::redis::url();
    let b = Backend {
        name: "redis",
        paused: false,
        native_expiry: true,
        sweeps_expired: false,
        global_tokens: false,
        default_cases: 32,
        max_ops: 12,
    };
    let setup = async {
        // A plain connection first: it fails at once when nothing listens.
        idem_support::redis::probe().await?;
        let client = redis::Client::open(url.as_str()).expect("a valid URL");
        let manager = client.get_connection_manager().await;
        manager
            .map_err(|e| idem_support::unavailable("Redis", e))
            .ok()
    };
    let run = format!("idem-model-{:016x}", rand::random::<u64>());
    check_real_time(b, setup, |con| {
        // A prefix of its own per case: a fresh, isolated store on the shared connection.
        let prefix = format!("{run}-{:016x}", rand::random::<u64>());
        let store = RedisStore::from_manager(con.clone(), &prefix).unwrap();
        async move {
            let store: Arc<dyn Store> = Arc::new(store);
            store
        }
    });
    // The fences would otherwise stay an hour.
    idem_support::redis::delete_matching(&format!("{run}-*"));
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_store_follows_the_model() {
    use idem_support::postgres;
    use idempotency::PostgresStore;

    let b = Backend {
        name: "postgres",
        paused: false,
        native_expiry: false,
        sweeps_expired: false,
        global_tokens: true,
        default_cases: 32,
        max_ops: 12,
    };
    let setup = async {
        // A table per case in the run's schema, on one pool.
        let schema = postgres::run_schema().await?;
        let pool = postgres::pool(&postgres::url().parse().expect("a valid URL"), 4);
        Some((pool, schema))
    };
    check_real_time(b, setup, |(pool, schema)| {
        let table = format!("{schema}.model_{:016x}", rand::random::<u64>());
        let store = PostgresStore::from_pool(pool.clone(), &table).unwrap();
        async move {
            store.create_table().await.unwrap();
            let store: Arc<dyn Store> = Arc::new(store);
            store
        }
    });
}
