//! A model check of the store state machine (design section 3): random sequences of claim,
//! complete, release, renew, get, purge, concurrent claim races and "advance time" steps, from
//! three callers over three keys, run against a store and against a small reference model. After
//! every step the store's answers must agree with the model:
//!
//! - `Acquired` only when the model says the key is free (never two holders at once; when all
//!   callers race for a free key, exactly one acquires), with a token greater than every earlier
//!   token of the key
//!   (and of the store, except Redis, whose tokens are ordered per key);
//! - `complete`/`release`/`renew` with a token that does not hold the key (taken over, released,
//!   completed, another key's, never issued) fail with `Error::LeaseLost` and change nothing;
//! - a completed record is returned byte-identical by `claim` and `get` until its ttl runs out, and
//!   never overwritten;
//! - expired leases are taken over (`takeover = true`), expired results run again.
//!
//! Time: the memory store runs on tokio's paused clock, moved by `tokio::time::advance`, so its
//! expiry is exact. SQLite, Redis and PostgreSQL use real clocks, so the "advance" step really
//! sleeps, leases and ttls are short (250 ms and 650 ms), and every step is timed: the model knows
//! each deadline only as an interval (the store read its clock somewhere between the start and the
//! end of the step that set it). A deadline that is neither clearly ahead nor clearly past is
//! "unknown": the store may answer either way, and the model then follows the store's answer (a
//! `LeaseLost` or a `None` proves the record expired). Advances are whole multiples of 100 ms and
//! the lease and ttl end on half units, so unknown cases are rare; they are counted.
//!
//! Cases: `PROPTEST_CASES` sets the number of cases for every store; by default 512 for memory
//! (12 to 24 steps each) and 32 for the others (6 to 12 steps each, 15 to 25 s per backend).
//! Redis and PostgreSQL are skipped when unreachable unless `IDEM_REQUIRE_SERVICES=1`.
//!
//! ```text
//! cargo test --all-features --test model -- --nocapture
//! ```

// Only `conformance::unavailable` is used here, not the suite.
#[allow(unused_imports)]
mod conformance;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem::{Claim, Error, FencingToken, Fingerprint, RecordState, StorageKey, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
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
    /// No live record. `takeover`: the flag the next acquire must report, if known.
    Absent { takeover: Option<bool> },
    InFlight {
        token: u64,
        fp: Option<Fingerprint>,
        until: Deadline,
        /// Proven expired by an answer of the store.
        dead: bool,
        /// A purge ran while its expiry was unknown: it may be gone.
        maybe_purged: bool,
    },
    Completed {
        token: u64,
        fp: Option<Fingerprint>,
        payload: Vec<u8>,
        until: Deadline,
        dead: bool,
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

/// The answer a claim gets from a live record.
fn live_answer(slot: &Slot, fp: Option<Fingerprint>) -> Claim {
    match slot {
        Slot::InFlight { fp: stored, .. } | Slot::Completed { fp: stored, .. }
            if !fingerprints_match(*stored, fp) =>
        {
            Claim::KeyReuse
        }
        Slot::InFlight { .. } => Claim::InFlight,
        Slot::Completed { payload, .. } => Claim::Completed(payload.clone().into()),
        Slot::Absent { .. } => unreachable!("absent slots are not live"),
    }
}

#[derive(Default, Debug)]
struct Stats {
    cases: u64,
    ops: BTreeMap<&'static str, u64>,
    acquired: u64,
    takeovers: u64,
    replays_checked: u64,
    stale_refused: u64,
    accepted: BTreeMap<&'static str, u64>,
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
    /// Tokens strictly increase across keys (all stores but Redis, whose fencing is per key).
    global_tokens: bool,
    slots: Vec<Slot>,
    /// Per caller, per key: the last token the caller acquired.
    held: Vec<HashMap<usize, u64>>,
    /// Per caller: the key and token of its last acquisition, until it completes or releases.
    jobs: Vec<Option<(usize, u64)>>,
    /// Every token issued, with its key.
    issued: Vec<(usize, u64)>,
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
            global_tokens,
            slots: vec![Slot::Absent { takeover: None }; KEYS],
            held: vec![HashMap::new(); CALLERS],
            jobs: vec![None; CALLERS],
            issued: Vec::new(),
            max_token: None,
            max_token_of_key: vec![None; KEYS],
            stats: Stats::default(),
        }
    }

    fn liveness(&self, key: usize, s: Instant, e: Instant) -> Live {
        let (until, dead) = match &self.slots[key] {
            Slot::Absent { .. } => return Live::No,
            Slot::InFlight { until, dead, .. } | Slot::Completed { until, dead, .. } => {
                (until, *dead)
            }
        };
        if dead {
            Live::No
        } else if until.lo > e + self.margin {
            Live::Yes
        } else if until.hi + self.margin <= s {
            Live::No
        } else {
            Live::Unknown
        }
    }

    fn mark_dead(&mut self, key: usize) {
        if let Slot::InFlight { dead, .. } | Slot::Completed { dead, .. } = &mut self.slots[key] {
            *dead = true;
        }
    }

    /// The takeover flag an acquire of `key` must report, if known.
    fn expected_takeover(&self, key: usize) -> Option<bool> {
        match &self.slots[key] {
            Slot::Absent { takeover } => *takeover,
            Slot::InFlight { maybe_purged, .. } => (!maybe_purged).then_some(true),
            Slot::Completed { .. } => Some(false),
        }
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

    /// Whether `token` holds `key` in the model (in flight with that token, maybe expired).
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
        if let Some(want) = self.expected_takeover(key) {
            prop_assert_eq!(takeover, want, "takeover flag of key {}", key);
        }
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
            until: Deadline {
                lo: s + LEASE,
                hi: e + LEASE,
            },
            dead: false,
            maybe_purged: false,
        };
        Ok(())
    }

    /// Checks one claim's answer against the model and applies it.
    fn check_claim(
        &mut self,
        caller: usize,
        key: usize,
        fp: Option<Fingerprint>,
        got: idem::Result<Claim>,
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
                if !matches!(self.slots[key], Slot::Absent { .. }) {
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
                    Claim::Completed(_) => self.stats.replays_checked += 1,
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

    /// A guarded step (complete, release, renew) with `token` on `key`: `Ok` only if the token
    /// holds a live lease. Returns whether the store accepted it.
    fn check_guarded(
        &mut self,
        what: &'static str,
        key: usize,
        token: u64,
        got: &idem::Result<()>,
        s: Instant,
        e: Instant,
    ) -> Result<bool, TestCaseError> {
        let live = self.liveness(key, s, e);
        let holder = self.holds(key, token);
        match got {
            Ok(()) => {
                prop_assert!(
                    holder && live != Live::No,
                    "{} with token {} of key {} accepted, model {:?} ({:?})",
                    what,
                    token,
                    key,
                    self.slots[key],
                    live
                );
                if live == Live::Unknown {
                    self.stats.unknown_resolved += 1;
                }
                *self.stats.accepted.entry(what).or_default() += 1;
                Ok(true)
            }
            Err(Error::LeaseLost) => {
                prop_assert!(
                    !(holder && live == Live::Yes),
                    "{} by the live holder {} of key {} refused",
                    what,
                    token,
                    key
                );
                if holder {
                    if live == Live::Unknown {
                        self.stats.unknown_resolved += 1;
                    }
                    // The holder's lease ran out: proven expired.
                    self.mark_dead(key);
                    self.stats.expired_seen += 1;
                } else {
                    self.stats.stale_refused += 1;
                }
                Ok(false)
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
                    .collect::<idem::Result<_>>()
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
                if self.check_guarded("complete", *key, *token, &got, s, e)? {
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
                if self.check_guarded("release", *key, *token, &got, s, e)? {
                    self.done(*caller, *key);
                    self.slots[*key] = Slot::Absent {
                        takeover: Some(false),
                    };
                }
            }
            Op::Renew { caller, key, pick } => {
                let (_, key, token) = &self.target(*caller, *key, *pick);
                let (got, s, e) = self
                    .timed(store.renew(&self.keys[*key], FencingToken(*token), LEASE))
                    .await;
                if self.check_guarded("renew", *key, *token, &got, s, e)? {
                    if let Slot::InFlight { until, .. } = &mut self.slots[*key] {
                        *until = Deadline {
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
                match (&got, live) {
                    (None, Live::No) => {}
                    (None, Live::Unknown) => {
                        self.stats.unknown_resolved += 1;
                        self.mark_dead(*key);
                    }
                    (None, Live::Yes) => {
                        return Err(TestCaseError::fail(format!(
                            "get lost the live record of key {key}: {:?}",
                            self.slots[*key]
                        )))
                    }
                    (Some(record), Live::Yes | Live::Unknown) => {
                        let (fp, state) = match &self.slots[*key] {
                            Slot::InFlight { token, fp, .. } => (
                                *fp,
                                RecordState::InFlight {
                                    token: FencingToken(*token),
                                },
                            ),
                            Slot::Completed {
                                token, fp, payload, ..
                            } => (
                                *fp,
                                RecordState::Completed {
                                    token: FencingToken(*token),
                                    record: payload.clone().into(),
                                },
                            ),
                            Slot::Absent { .. } => unreachable!("absent is not live"),
                        };
                        prop_assert_eq!(record.fingerprint, fp, "fingerprint of key {}", key);
                        prop_assert_eq!(&record.state, &state, "state of key {}", key);
                        if matches!(state, RecordState::Completed { .. }) {
                            self.stats.replays_checked += 1;
                        }
                    }
                    (Some(record), Live::No) => {
                        return Err(TestCaseError::fail(format!(
                            "get of key {key} found {record:?}, model says expired: {:?}",
                            self.slots[*key]
                        )))
                    }
                }
            }
            Op::Purge => {
                let (got, s, e) = self.timed(store.purge_expired()).await;
                let removed =
                    got.map_err(|e| TestCaseError::fail(format!("purge failed: {e:?}")))?;
                let (mut sure, mut maybe) = (0, 0);
                for key in 0..KEYS {
                    let purged_before = matches!(
                        &self.slots[key],
                        Slot::InFlight {
                            maybe_purged: true,
                            ..
                        } | Slot::Completed {
                            maybe_purged: true,
                            ..
                        }
                    );
                    match (self.liveness(key, s, e), &self.slots[key]) {
                        (_, Slot::Absent { .. }) => {}
                        (Live::No, _) if !purged_before => sure += 1,
                        (Live::No | Live::Unknown, _) => maybe += 1,
                        (Live::Yes, _) => {}
                    }
                }
                if self.native_expiry {
                    prop_assert_eq!(removed, 0, "a store with native expiry purges nothing");
                } else {
                    prop_assert!(
                        (sure..=sure + maybe).contains(&removed),
                        "purge removed {}, expected {} to {}",
                        removed,
                        sure,
                        sure + maybe
                    );
                    for key in 0..KEYS {
                        match self.liveness(key, s, e) {
                            Live::No => {
                                if !matches!(self.slots[key], Slot::Absent { .. }) {
                                    self.slots[key] = Slot::Absent {
                                        takeover: Some(false),
                                    };
                                }
                            }
                            Live::Unknown => {
                                if let Slot::InFlight { maybe_purged, .. }
                                | Slot::Completed { maybe_purged, .. } = &mut self.slots[key]
                                {
                                    *maybe_purged = true;
                                }
                            }
                            Live::Yes => {}
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
    let mut hasher = DefaultHasher::new();
    for (i, op) in ops.iter().enumerate() {
        op.shape().hash(&mut hasher);
        h.step(op)
            .await
            .map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {e}\nops: {ops:#?}")))?;
    }
    let mut t = totals.lock().unwrap();
    t.cases += 1;
    for (k, v) in h.stats.ops {
        *t.ops.entry(k).or_default() += v;
    }
    t.acquired += h.stats.acquired;
    t.takeovers += h.stats.takeovers;
    t.replays_checked += h.stats.replays_checked;
    t.stale_refused += h.stats.stale_refused;
    for (k, v) in h.stats.accepted {
        *t.accepted.entry(k).or_default() += v;
    }
    t.key_reuses += h.stats.key_reuses;
    t.in_flight += h.stats.in_flight;
    t.expired_seen += h.stats.expired_seen;
    t.unknown_resolved += h.stats.unknown_resolved;
    t.races_with_one_winner += h.stats.races_with_one_winner;
    t.shapes.insert(hasher.finish());
    Ok(())
}

fn report(name: &str, t: &Stats) {
    let total: u64 = t.ops.values().sum();
    eprintln!(
        "model[{name}]: {} cases, {total} operations {:?}, {} distinct interleavings; \
         {} acquisitions ({} takeovers, {} races with one winner), accepted {:?}, {} stale tokens refused, \
         {} replays checked byte for byte, {} in-flight and {} key-reuse answers, \
         {} expiries observed, {} unknown deadlines resolved by the store; \
         duplicate holders found: 0, lost or overwritten results: 0",
        t.cases,
        t.ops,
        t.shapes.len(),
        t.acquired,
        t.takeovers,
        t.races_with_one_winner,
        t.accepted,
        t.stale_refused,
        t.replays_checked,
        t.in_flight,
        t.key_reuses,
        t.expired_seen,
        t.unknown_resolved,
    );
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
            let store = idem::MemoryStore::new();
            run_case(&b, &store, &ops, &totals).await
        })
    });
    finish(b.name, result, &totals);
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_store_follows_the_model() {
    use idem::SqliteStore;

    let dir = tempfile::tempdir().unwrap();
    let b = Backend {
        name: "sqlite",
        paused: false,
        native_expiry: false,
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
    use idem::store::redis::redis;
    use idem::RedisStore;

    let url = conformance::redis_url();
    let b = Backend {
        name: "redis",
        paused: false,
        native_expiry: true,
        global_tokens: false,
        default_cases: 32,
        max_ops: 12,
    };
    let setup = async {
        let client = match redis::Client::open(url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                conformance::unavailable("Redis", e);
                return None;
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), client.get_connection_manager()).await {
            Ok(Ok(con)) => Some(con),
            Ok(Err(e)) => {
                conformance::unavailable("Redis", e);
                None
            }
            Err(_) => {
                conformance::unavailable("Redis", "connecting timed out");
                None
            }
        }
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
    if let Ok(mut con) = redis::Client::open(url).and_then(|c| c.get_connection()) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{run}-*"))
            .query(&mut con)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut con);
        }
    }
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_store_follows_the_model() {
    use idem::store::postgres::deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
    use idem::store::postgres::tokio_postgres::{self, NoTls};
    use idem::PostgresStore;

    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let b = Backend {
        name: "postgres",
        paused: false,
        native_expiry: false,
        global_tokens: true,
        default_cases: 32,
        max_ops: 12,
    };
    let setup = async {
        let (client, connection) = match tokio_postgres::connect(&url, NoTls).await {
            Ok(c) => c,
            Err(e) => {
                conformance::unavailable("PostgreSQL", format!("{e} ({url})"));
                return None;
            }
        };
        tokio::spawn(connection);
        // A schema of this run, named like the conformance suite's so that later runs drop it.
        let epoch: i64 = client
            .query_one("SELECT extract(epoch FROM now())::bigint", &[])
            .await
            .unwrap()
            .get(0);
        let schema = format!("idem_test_{epoch}_{}", std::process::id());
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .await
            .unwrap();
        let config: tokio_postgres::Config = url.parse().unwrap();
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager).max_size(4).build().unwrap();
        Some((pool, schema, client))
    };
    check_real_time(b, setup, |(pool, schema, _)| {
        let table = format!("{schema}.model_{:016x}", rand::random::<u64>());
        let store = PostgresStore::from_pool(pool.clone(), &table).unwrap();
        async move {
            store.create_table().await.unwrap();
            let store: Arc<dyn Store> = Arc::new(store);
            store
        }
    });
}
