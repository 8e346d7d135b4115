//! Section 6 (`http`): one axum `POST /charge` served on loopback and driven over keep-alive
//! HTTP/1.1 by a load generator in this process, bare, behind `IdempotencyLayer` (memory store,
//! Redis, Redis behind the local cache) and behind axum-idempotent 0.6, in one run.
//!
//! - **Runtime**: one tokio runtime with 2 worker threads (the machine has 2 cores) runs every
//!   server and the load generator; each variant is an `axum::serve` of its own on
//!   `127.0.0.1:0`, `TCP_NODELAY` on both sides.
//! - **Handler**: the same everywhere. It counts its starts (an `AtomicUsize`, first thing in
//!   its body), parses the workload's `ChargeRequest` (~110 bytes of JSON) and answers its
//!   ~200-byte `Receipt`.
//! - **Load generator**: N connections (hyper 1's HTTP/1.1 client), each sending its requests
//!   back to back, for a time window and at most [`MAX_REQUESTS_PER_CONN`] requests; each
//!   request's latency, from sending it to having read the whole answer, goes into an HDR
//!   histogram (microseconds). Every answer's status is checked.
//! - **First requests**: a fresh `Idempotency-Key` (and order id) per request. **Replays**: each
//!   connection first answers [`REPLAY_KEYS`] keys (untimed), then sends them again in turn;
//!   every answer must be marked replayed and the handler must not start during the window
//!   (its starts are counted). Bare axum gets the first requests' traffic (it ignores keys).
//! - **axum-idempotent** keys its cache by session: a response is kept only for a request that
//!   carries a ruts session cookie, so each connection opens a session (`POST /session`,
//!   untimed) and sends its cookie, which is the main figure; the same run also measures one
//!   session shared by all connections. It runs in its direct-key mode (`Idempotency-Key` as
//!   the cache key, no request hashing), with ruts' moka store. ruts' Redis store is not
//!   measured: it needs Redis 7.4 (`HEXPIRE`), and the test server is 7.0.
//! - **Rounds**: each figure is [`ROUNDS`] windows of `IDEM_BENCH_HTTP_SECS / ROUNDS` seconds
//!   (default 2 s in all), the variants taking turns window by window so that a load from
//!   elsewhere on the machine falls on all of them; every variant is warmed up first.
//! - **Duplicates**: [`DUPLICATES`] requests with one key and one body sent at once on as many
//!   connections, [`BURSTS`] times, counting handler starts per burst: with the handler above,
//!   which is done in microseconds, so that on 2 cores the duplicates mostly arrive after it
//!   finished, and with the same handler taking [`SLOW_HANDLER`] (a payment processor's round
//!   trip), so that they arrive while it runs. The JSON fields `http_*_duplicate_runs` are the
//!   latter's, the worst burst; `..._instant` the former's.
//!
//! The Redis keys the section writes are under a prefix of its own, deleted at the end and
//! looked for with `SCAN` afterwards.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use idem_support::workload::{compute, request, unbounded_memory_store, ChargeRequest, Receipt};
use idempotency::http::IdempotencyLayer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Barrier};
use tower::ServiceExt;

use crate::Report;

/// Connection counts measured; the JSON fields without a suffix are the first one's.
const CONNS: [usize; 2] = [16, 64];
/// Windows per figure, the variants taking turns.
const ROUNDS: u32 = 2;
/// Seconds per figure (all its rounds) unless `IDEM_BENCH_HTTP_SECS` says otherwise.
const DEFAULT_SECS: f64 = 2.0;
/// Upper bound on the requests of one connection in one window, whatever the clock says.
const MAX_REQUESTS_PER_CONN: u64 = 1_000_000;
/// Keys each connection answers before a replay window, and sends again in turn in it.
const REPLAY_KEYS: usize = 32;
/// Untimed first requests each connection sends before a first-request window.
const LEAD_IN_REQUESTS: usize = 8;
/// The untimed warm-up of each variant.
const WARM_UP: Duration = Duration::from_millis(300);
/// Requests sent at once with one key, and how many times.
const DUPLICATES: usize = 50;
const BURSTS: usize = 5;
/// How long the handler takes in the second set of duplicate bursts: a payment processor's
/// round trip, so that the duplicates arrive while it runs (the bench's handler is done in
/// microseconds, before most of them are read on 2 cores).
const SLOW_HANDLER: Duration = Duration::from_millis(20);
/// How long kept responses live (the Redis ones are also deleted at the end).
const TTL: Duration = Duration::from_secs(600);
/// The scope of every `IdempotencyLayer` here: one client, shared on purpose.
const SCOPE: &str = "bench-http";
/// Replay markers: idem's, and axum-idempotent's default.
const IDEM_REPLAYED: &str = "idempotent-replayed";
const AXUM_IDEMPOTENT_REPLAYED: &str = "idempotency-replayed";

type Res<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ---------------------------------------------------------------------------------------------
// The server side

/// The handler's state: where it counts its starts, and how long it takes (zero but for the
/// second set of duplicate bursts, where it stands for a payment processor's round trip).
#[derive(Clone)]
struct Handler {
    starts: Arc<AtomicUsize>,
    delay: Duration,
}

/// The handler: counts its start, then parses the charge and answers its receipt.
async fn charge(State(handler): State<Handler>, Json(req): Json<ChargeRequest>) -> Json<Receipt> {
    handler.starts.fetch_add(1, Ordering::Relaxed);
    if !handler.delay.is_zero() {
        tokio::time::sleep(handler.delay).await;
    }
    Json(compute(&req))
}

/// The bare app: `POST /charge`.
fn charge_app(handler: Handler) -> Router {
    Router::new()
        .route("/charge", post(charge))
        .with_state(handler)
}

/// `IdempotencyLayer` on `store`, as every idem variant (and the profile) builds it.
fn idem_layer(store: impl idempotency::IntoStore) -> IdempotencyLayer {
    IdempotencyLayer::shared(store, SCOPE).ttl(TTL)
}

/// axum-idempotent 0.6 on `/charge` (direct-key mode, the key header required), inside a ruts
/// session layer on a moka store, with `POST /session` opening a session for a client.
fn axum_idempotent_app(handler: Handler) -> Router {
    use axum_idempotent::{IdempotentLayer, IdempotentOptions};
    use ruts::store::moka::MokaStore;
    use ruts::{CookieOptions, Session, SessionLayer};

    let store = Arc::new(MokaStore::builder().max_capacity(100_000).build());
    let options = IdempotentOptions::default()
        .use_idempotency_key_header(Some("idempotency-key"), true)
        .expire_after(TTL.as_secs() as i64);
    let open_session = |session: Session<MokaStore>| async move {
        let ttl = ruts::store::Ttl::new(TTL.as_secs() as i64).expect("a ttl in range");
        match session.set("client", &"bench", ttl, None).await {
            Ok(()) => StatusCode::NO_CONTENT,
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    };
    Router::new()
        .route(
            "/charge",
            post(charge).layer(IdempotentLayer::<MokaStore>::new(options)),
        )
        .route("/session", post(open_session))
        .with_state(handler)
        .layer(
            SessionLayer::new(store).with_cookie_options(
                CookieOptions::build()
                    .name("session")
                    .max_age(TTL.as_secs())
                    .path("/"),
            ),
        )
        .layer(tower_cookies::CookieManagerLayer::new())
}

/// A server running `app` on `127.0.0.1:0` until [`Server::stop`].
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(app: Router) -> Res<Server> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Server { addr, stop, task })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator

/// Where fresh keys and order ids come from: unique in the run, under a tag of the run's own.
static NEXT_ORDER: AtomicU64 = AtomicU64::new(1);

fn run_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| format!("{:08x}", rand::random::<u32>()))
}

/// A fresh key and the body of its charge.
fn fresh() -> (String, Bytes) {
    let order = NEXT_ORDER.fetch_add(1, Ordering::Relaxed);
    (format!("{}-{order}", run_tag()), charge_body(order))
}

/// The JSON body of the workload's request for `order`.
fn charge_body(order: u64) -> Bytes {
    Bytes::from(serde_json::to_vec(&request(order)).expect("a request serializes"))
}

/// What the load generator keeps of an answer.
struct Answer {
    status: StatusCode,
    replayed: bool,
    cookie: Option<HeaderValue>,
}

/// One keep-alive HTTP/1.1 connection.
struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
    host: HeaderValue,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Res<Client> {
        let stream = TcpStream::connect(addr).await.map_err(err)?;
        stream.set_nodelay(true).map_err(err)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(err)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = HeaderValue::from_str(&addr.to_string()).map_err(err)?;
        Ok(Client { sender, host })
    }

    /// POSTs `body` to `path` with `key` and `cookie`, and reads the whole answer.
    async fn post(
        &mut self,
        path: &str,
        key: Option<&str>,
        body: Bytes,
        cookie: Option<&HeaderValue>,
    ) -> Res<Answer> {
        let mut req = Request::post(path)
            .header(header::HOST, self.host.clone())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        if let Some(cookie) = cookie {
            req = req.header(header::COOKIE, cookie.clone());
        }
        let req = req.body(Full::new(body)).map_err(err)?;
        self.sender.ready().await.map_err(err)?;
        let res = self.sender.send_request(req).await.map_err(err)?;
        let status = res.status();
        let headers = res.headers();
        let replayed =
            headers.contains_key(IDEM_REPLAYED) || headers.contains_key(AXUM_IDEMPOTENT_REPLAYED);
        let cookie = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("session="))
            .and_then(|v| HeaderValue::from_str(v.split(';').next()?).ok());
        res.into_body().collect().await.map_err(err)?;
        Ok(Answer {
            status,
            replayed,
            cookie,
        })
    }

    /// Opens an axum-idempotent session: the cookie to send.
    async fn open_session(&mut self) -> Res<HeaderValue> {
        let answer = self.post("/session", None, Bytes::new(), None).await?;
        answer
            .cookie
            .filter(|_| answer.status.is_success())
            .ok_or_else(|| format!("POST /session answered {} without a cookie", answer.status))
    }
}

/// First requests or replays.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    First,
    Replay,
}

/// Which session cookie each connection sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sessions {
    /// None: the server needs none.
    None,
    /// One opened by each connection.
    PerConnection,
    /// One opened for the window and sent on every connection.
    Shared,
}

/// A latency histogram in microseconds, up to a minute.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What windows measured, added up.
struct Tally {
    requests: u64,
    secs: f64,
    latency: Histogram<u64>,
    not_ok: u64,
    replayed: u64,
    /// Handler starts during the windows (not during their untimed set-up).
    runs: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            requests: 0,
            secs: 0.0,
            latency: histogram(),
            not_ok: 0,
            replayed: 0,
            runs: 0,
        }
    }

    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.secs += other.secs;
        self.latency
            .add(&other.latency)
            .expect("histograms of the same bounds");
        self.not_ok += other.not_ok;
        self.replayed += other.replayed;
        self.runs += other.runs;
    }

    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs.max(f64::MIN_POSITIVE)
    }

    fn p99_us(&self) -> f64 {
        self.latency.value_at_quantile(0.99) as f64
    }

    /// What is wrong with the answers, if anything.
    fn problems(&self, mode: Mode, idempotent: bool) -> Option<String> {
        let mut problems = Vec::new();
        if self.not_ok > 0 {
            problems.push(format!("{} answers not 200", self.not_ok));
        }
        match (mode, idempotent) {
            (Mode::Replay, true) => {
                if self.replayed != self.requests {
                    problems.push(format!(
                        "{} of {} not replayed",
                        self.requests - self.replayed,
                        self.requests
                    ));
                }
                if self.runs > 0 {
                    problems.push(format!("{} handler starts", self.runs));
                }
            }
            _ => {
                if self.replayed > 0 {
                    problems.push(format!("{} replayed", self.replayed));
                }
                if self.runs != self.requests {
                    problems.push(format!(
                        "{} handler starts for {} requests",
                        self.runs, self.requests
                    ));
                }
            }
        }
        (!problems.is_empty()).then(|| problems.join(", "))
    }
}

/// One connection's part of a window.
struct ConnPart {
    start: Instant,
    end: Instant,
    requests: u64,
    latency: Histogram<u64>,
    not_ok: u64,
    replayed: u64,
    set_up_runs: u64,
}

/// One connection: opens its session if it needs one, answers its replay keys (or sends its
/// lead-in), waits for the others, then sends back to back until `window` ends.
async fn connection(
    addr: SocketAddr,
    mode: Mode,
    sessions: Sessions,
    shared_cookie: Option<HeaderValue>,
    window: Duration,
    barrier: Arc<Barrier>,
) -> Res<ConnPart> {
    // Set up; the barrier is passed whatever happens, so no connection waits for a failed one.
    let set_up = async {
        let mut client = Client::connect(addr).await?;
        let cookie = match sessions {
            Sessions::None => None,
            Sessions::PerConnection => Some(client.open_session().await?),
            Sessions::Shared => shared_cookie,
        };
        let mut keys = Vec::new();
        let mut set_up_runs = 0u64;
        let count = match mode {
            Mode::First => LEAD_IN_REQUESTS,
            Mode::Replay => REPLAY_KEYS,
        };
        for _ in 0..count {
            let (key, body) = fresh();
            let answer = client
                .post("/charge", Some(&key), body.clone(), cookie.as_ref())
                .await?;
            if answer.status != StatusCode::OK {
                return Err(format!("set-up request answered {}", answer.status));
            }
            set_up_runs += 1;
            keys.push((key, body));
        }
        Ok::<_, String>((client, cookie, keys, set_up_runs))
    }
    .await;
    barrier.wait().await;
    let (mut client, cookie, keys, set_up_runs) = set_up?;

    let start = Instant::now();
    let deadline = start + window;
    let mut part = ConnPart {
        start,
        end: start,
        requests: 0,
        latency: histogram(),
        not_ok: 0,
        replayed: 0,
        set_up_runs,
    };
    while part.requests < MAX_REQUESTS_PER_CONN && Instant::now() < deadline {
        let (key, body) = match mode {
            Mode::First => fresh(),
            Mode::Replay => keys[part.requests as usize % keys.len()].clone(),
        };
        let sent = Instant::now();
        let answer = client
            .post("/charge", Some(&key), body, cookie.as_ref())
            .await?;
        part.latency
            .saturating_record(sent.elapsed().as_micros().max(1) as u64);
        part.requests += 1;
        part.not_ok += u64::from(answer.status != StatusCode::OK);
        part.replayed += u64::from(answer.replayed);
    }
    part.end = Instant::now();
    Ok(part)
}

/// One window of `conns` connections against `server`.
async fn window(
    target: &Target,
    conns: usize,
    mode: Mode,
    sessions: Sessions,
    window: Duration,
) -> Res<Tally> {
    let shared_cookie = match sessions {
        Sessions::Shared => Some(Client::connect(target.addr).await?.open_session().await?),
        _ => None,
    };
    let starts_before = target.starts.load(Ordering::SeqCst);
    let barrier = Arc::new(Barrier::new(conns));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(connection(
                target.addr,
                mode,
                sessions,
                shared_cookie.clone(),
                window,
                barrier.clone(),
            ))
        })
        .collect();
    let mut parts = Vec::with_capacity(conns);
    for task in tasks {
        let joined = tokio::time::timeout(window + Duration::from_secs(30), task)
            .await
            .map_err(|_| "a connection did not finish in time".to_owned())?;
        parts.push(joined.map_err(err)??);
    }
    let runs = (target.starts.load(Ordering::SeqCst) - starts_before) as u64;
    let mut tally = Tally::new();
    let first = parts.iter().map(|p| p.start).min().expect("connections");
    let last = parts.iter().map(|p| p.end).max().expect("connections");
    tally.secs = (last - first).as_secs_f64();
    tally.runs = runs - parts.iter().map(|p| p.set_up_runs).sum::<u64>();
    for p in &parts {
        tally.requests += p.requests;
        tally
            .latency
            .add(&p.latency)
            .expect("histograms of the same bounds");
        tally.not_ok += p.not_ok;
        tally.replayed += p.replayed;
    }
    Ok(tally)
}

/// What [`DUPLICATES`] requests with one key sent at once came to.
struct Burst {
    runs: usize,
    statuses: BTreeMap<u16, usize>,
    replayed: usize,
    /// Whether one more request with the key, after the burst, was answered as a replay.
    later_replayed: bool,
}

/// [`DUPLICATES`] connections (sharing one session, or each with its own) send one key and
/// one body at once.
async fn burst(target: &Target, sessions: Sessions) -> Res<Burst> {
    let shared_cookie = match sessions {
        Sessions::Shared => Some(Client::connect(target.addr).await?.open_session().await?),
        _ => None,
    };
    let mut clients = Vec::with_capacity(DUPLICATES);
    for _ in 0..DUPLICATES {
        let mut client = Client::connect(target.addr).await?;
        let cookie = match sessions {
            Sessions::None => None,
            Sessions::PerConnection => Some(client.open_session().await?),
            Sessions::Shared => shared_cookie.clone(),
        };
        clients.push((client, cookie));
    }
    let (key, body) = fresh();
    let starts_before = target.starts.load(Ordering::SeqCst);
    let barrier = Arc::new(Barrier::new(DUPLICATES));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(mut client, cookie)| {
            let (key, body, barrier) = (key.clone(), body.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let answer = client
                    .post("/charge", Some(&key), body, cookie.as_ref())
                    .await;
                (client, cookie, answer)
            })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    let mut replayed = 0;
    let mut last = None;
    for task in tasks {
        let (client, cookie, answer) = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .map_err(|_| "a duplicate did not finish in time".to_owned())?
            .map_err(err)?;
        let answer = answer?;
        *statuses.entry(answer.status.as_u16()).or_insert(0) += 1;
        replayed += usize::from(answer.replayed);
        last = Some((client, cookie));
    }
    // idem runs the handler on a task of its own: let a 409'd burst's handler finish.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let runs = target.starts.load(Ordering::SeqCst) - starts_before;
    let (mut client, cookie) = last.expect("duplicates");
    let later = client
        .post("/charge", Some(&key), body, cookie.as_ref())
        .await?;
    Ok(Burst {
        runs,
        statuses,
        replayed,
        later_replayed: later.replayed,
    })
}

// ---------------------------------------------------------------------------------------------
// The section

/// A server measured, and how its clients talk to it.
struct Target {
    /// The row label.
    label: &'static str,
    /// The JSON field stem (`http_<stem>_first_rps`...).
    stem: &'static str,
    addr: SocketAddr,
    starts: Arc<AtomicUsize>,
    sessions: Sessions,
    /// Whether it replays (all but bare axum).
    idempotent: bool,
}

/// The servers of the section, started.
struct Servers {
    servers: Vec<Server>,
    targets: Vec<Target>,
}

impl Servers {
    /// Starts `app` with a handler taking `delay`, measured as each of `views`.
    async fn add(
        &mut self,
        delay: Duration,
        app: impl FnOnce(Handler) -> Router,
        views: &[(&'static str, &'static str, Sessions)],
    ) -> Res<()> {
        let starts = Arc::new(AtomicUsize::new(0));
        let handler = Handler {
            starts: starts.clone(),
            delay,
        };
        let server = Server::start(app(handler)).await?;
        for &(label, stem, sessions) in views {
            self.targets.push(Target {
                label,
                stem,
                addr: server.addr,
                starts: starts.clone(),
                sessions,
                idempotent: stem != "bare",
            });
        }
        self.servers.push(server);
        Ok(())
    }

    /// Every variant, its handler taking `delay`; the Redis ones under `redis_prefix`, if
    /// given.
    async fn start(delay: Duration, redis_prefix: Option<&str>) -> Res<Servers> {
        let mut s = Servers {
            servers: Vec::new(),
            targets: Vec::new(),
        };
        s.add(delay, charge_app, &[("bare axum", "bare", Sessions::None)])
            .await?;
        s.add(
            delay,
            |h| charge_app(h).layer(idem_layer(unbounded_memory_store())),
            &[("idem memory", "idem_memory", Sessions::None)],
        )
        .await?;
        #[cfg(feature = "redis")]
        if let Some(prefix) = redis_prefix {
            let url = idem_support::redis::url();
            let store = idempotency::RedisStore::connect_with_prefix(&url, prefix)
                .await
                .map_err(err)?;
            s.add(
                delay,
                |h| charge_app(h).layer(idem_layer(store)),
                &[("idem Redis", "idem_redis", Sessions::None)],
            )
            .await?;
            let store = idempotency::RedisStore::connect_with_prefix(&url, prefix)
                .await
                .map_err(err)?;
            s.add(
                delay,
                |h| charge_app(h).layer(idem_layer(idempotency::LocalCache::new(store))),
                &[(
                    "idem local cache + Redis",
                    "idem_local_cache_redis",
                    Sessions::None,
                )],
            )
            .await?;
        }
        #[cfg(not(feature = "redis"))]
        let _ = redis_prefix;
        s.add(
            delay,
            axum_idempotent_app,
            &[
                (
                    "axum-idempotent moka, session per conn",
                    "axum_idempotent",
                    Sessions::PerConnection,
                ),
                (
                    "axum-idempotent moka, one session",
                    "axum_idempotent_one_session",
                    Sessions::Shared,
                ),
            ],
        )
        .await?;
        Ok(s)
    }

    async fn stop(self) {
        for server in self.servers {
            server.stop().await;
        }
    }
}

/// The seconds of one figure: `IDEM_BENCH_HTTP_SECS`, or [`DEFAULT_SECS`].
fn figure_secs() -> f64 {
    std::env::var("IDEM_BENCH_HTTP_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(DEFAULT_SECS)
}

/// The modes a target is measured in.
fn modes(target: &Target) -> &'static [Mode] {
    if target.idempotent {
        &[Mode::First, Mode::Replay]
    } else {
        &[Mode::First]
    }
}

/// Section 6: builds its own 2-worker runtime, on which every server and client runs.
pub(crate) fn section(r: &mut Report) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let secs = figure_secs();
    r.section(&format!(
        "6. HTTP: axum POST /charge over keep-alive HTTP/1.1 on loopback; \
         server and load generator on one 2-worker runtime; {ROUNDS} x {:.1} s per figure",
        secs / ROUNDS as f64
    ));
    if let Err(e) = rt.block_on(run(r, secs)) {
        eprintln!("bench_report: section http stopped: {e}");
        r.row("HTTP: stopped", e);
    }
}

async fn run(r: &mut Report, secs: f64) -> Res<()> {
    // What is not measured, and why.
    let mut skipped: Vec<(String, String)> = vec![(
        "axum-idempotent on ruts' Redis store".into(),
        "not measured: it needs Redis 7.4 (HEXPIRE)".into(),
    )];
    #[cfg(feature = "redis")]
    let redis_prefix = match idem_support::redis::connect(&idem_support::redis::url()).await {
        Ok(_) => Some(format!("idem-bench-http-{:016x}", rand::random::<u64>())),
        Err(e) => {
            eprintln!("bench_report: Redis unreachable ({e}); its http rows are skipped");
            skipped.push((
                "idem Redis (IDEM_REDIS_URL)".into(),
                format!("unreachable: {e}"),
            ));
            None
        }
    };
    #[cfg(not(feature = "redis"))]
    let redis_prefix: Option<String> = {
        skipped.push((
            "idem Redis".into(),
            "not built: run with --features redis".into(),
        ));
        None
    };
    let outcome = measure(r, secs, redis_prefix.as_deref(), &skipped).await;
    #[cfg(feature = "redis")]
    if let Some(prefix) = redis_prefix {
        let left = clean_up_redis(&prefix).await;
        r.row(
            "Redis keys of the section left after its clean-up (SCAN)",
            format!("{left:>9}"),
        );
        r.field("http_redis_keys_left", left as f64);
    }
    outcome
}

/// The rates, then the duplicate bursts with the same servers, then with a slow handler.
async fn measure(
    r: &mut Report,
    secs: f64,
    redis_prefix: Option<&str>,
    skipped: &[(String, String)],
) -> Res<()> {
    let servers = Servers::start(Duration::ZERO, redis_prefix).await?;
    let mut outcome = rates(r, &servers.targets, secs).await;
    for (what, why) in skipped {
        r.row(what, why.clone());
    }
    if outcome.is_ok() {
        outcome = duplicates(r, &servers.targets, Duration::ZERO).await;
    }
    servers.stop().await;
    outcome?;
    let slow = Servers::start(SLOW_HANDLER, redis_prefix).await?;
    let outcome = duplicates(r, &slow.targets, SLOW_HANDLER).await;
    slow.stop().await;
    outcome
}

/// The rate windows, every variant warmed up first.
async fn rates(r: &mut Report, targets: &[Target], secs: f64) -> Res<()> {
    let window_len = Duration::from_secs_f64(secs / ROUNDS as f64);
    for target in targets {
        window(target, CONNS[0], Mode::First, target.sessions, WARM_UP).await?;
    }
    let mut tallies: BTreeMap<(usize, usize, Mode), Tally> = BTreeMap::new();
    for conns in CONNS {
        for _ in 0..ROUNDS {
            for (t, target) in targets.iter().enumerate() {
                for &mode in modes(target) {
                    let measured = window(target, conns, mode, target.sessions, window_len).await?;
                    tallies
                        .entry((conns, t, mode))
                        .or_insert_with(Tally::new)
                        .add(&measured);
                }
            }
        }
    }
    report_rates(r, targets, &tallies);
    Ok(())
}

fn report_rates(
    r: &mut Report,
    targets: &[Target],
    tallies: &BTreeMap<(usize, usize, Mode), Tally>,
) {
    let bare = targets
        .iter()
        .position(|t| t.stem == "bare")
        .expect("bare axum is measured");
    // Side by side on the same store: idem and axum-idempotent in memory; the local cache
    // against Redis alone.
    let pairs = [
        (
            "idem_memory",
            "axum_idempotent",
            "axum-idempotent (session per conn)",
        ),
        ("idem_local_cache_redis", "idem_redis", "idem Redis"),
    ];
    let position = |stem: &str| targets.iter().position(|t| t.stem == stem);
    let mut checks = Vec::new();
    for conns in CONNS {
        let base = &tallies[&(conns, bare, Mode::First)];
        r.row(
            &format!("{conns} connections"),
            format!("{:>9} {:>9}   vs bare axum", "req/s", "p99 us"),
        );
        for (t, target) in targets.iter().enumerate() {
            for &mode in modes(target) {
                let tally = &tallies[&(conns, t, mode)];
                let what = match (target.idempotent, mode) {
                    (false, _) => String::new(),
                    (true, Mode::First) => ": first requests".into(),
                    (true, Mode::Replay) => ": replays".into(),
                };
                let mut value = format!(
                    "{:>9.0} {:>9.0}   {:.2}x",
                    tally.rps(),
                    tally.p99_us(),
                    tally.rps() / base.rps()
                );
                for (stem, other, name) in pairs {
                    if let (true, Some(o)) = (target.stem == stem, position(other)) {
                        let other = &tallies[&(conns, o, mode)];
                        value += &format!("   {:.2}x {name}", tally.rps() / other.rps());
                    }
                }
                if let Some(problem) = tally.problems(mode, target.idempotent) {
                    value += &format!("   CHECK: {problem}");
                    checks.push(format!(
                        "{}{what}, {conns} connections: {problem}",
                        target.label
                    ));
                }
                r.row(&format!("  {}{what}", target.label), value);
                let name = match (target.idempotent, mode) {
                    (false, _) => format!("http_{}", target.stem),
                    (true, Mode::First) => format!("http_{}_first", target.stem),
                    (true, Mode::Replay) => format!("http_{}_replay", target.stem),
                };
                r.field(&format!("{name}_rps_{conns}"), tally.rps());
                r.field(&format!("{name}_p99_us_{conns}"), tally.p99_us());
                if conns == CONNS[0] {
                    r.field(&format!("{name}_rps"), tally.rps());
                    r.field(&format!("{name}_p99_us"), tally.p99_us());
                }
            }
        }
    }
    r.row(
        "every answer 200; replays all replayed, no handler start",
        crate::verdict(checks.is_empty()),
    );
    for check in checks {
        eprintln!("bench_report: http: {check}");
    }
}

/// The duplicate bursts, the handler taking `delay`: every idem variant, and axum-idempotent
/// with one session shared by the duplicates (the same client retrying: it keeps responses
/// per session) and with a session per connection (to it, as many clients as connections).
async fn duplicates(r: &mut Report, targets: &[Target], delay: Duration) -> Res<()> {
    let (handler, suffix) = if delay.is_zero() {
        ("the handler above".to_owned(), "_instant")
    } else {
        (format!("a handler taking {} ms", delay.as_millis()), "")
    };
    r.row(
        &format!("{DUPLICATES} duplicates at once x{BURSTS}, {handler}"),
        "handler starts per burst; answers".into(),
    );
    let mut cases = Vec::new();
    for target in targets {
        if target.stem.starts_with("idem") {
            cases.push((target, Sessions::None, target.label, target.stem));
        } else if target.stem == "axum_idempotent" {
            cases.push((
                target,
                Sessions::Shared,
                "axum-idempotent moka, one session",
                "axum_idempotent",
            ));
            cases.push((
                target,
                Sessions::PerConnection,
                "axum-idempotent moka, session per conn",
                "axum_idempotent_session_per_conn",
            ));
        }
    }
    for (target, sessions, label, stem) in cases {
        let mut runs = Vec::new();
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        let mut replayed = 0;
        let mut later_replayed = 0;
        for _ in 0..BURSTS {
            let b = burst(target, sessions).await?;
            runs.push(b.runs);
            for (status, n) in b.statuses {
                *statuses.entry(status).or_insert(0) += n;
            }
            replayed += b.replayed;
            later_replayed += usize::from(b.later_replayed);
        }
        let answers = statuses
            .iter()
            .map(|(s, n)| format!("{s} x{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let per_burst = runs
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        r.row(
            &format!("  {label}"),
            format!(
                "{per_burst:>14}   {answers} ({replayed} replayed); \
                 a retry after the burst replayed {later_replayed}/{BURSTS}"
            ),
        );
        let worst = runs.iter().copied().max().unwrap_or(0) as f64;
        r.field(&format!("http_{stem}_duplicate_runs{suffix}"), worst);
        if stem == "idem_memory" {
            // The headline name: IdempotencyLayer on the memory store.
            r.field(&format!("http_idem_duplicate_runs{suffix}"), worst);
        }
    }
    Ok(())
}

/// Deletes the section's Redis keys, then counts (with `SCAN`) those left.
#[cfg(feature = "redis")]
async fn clean_up_redis(prefix: &str) -> usize {
    let owned = prefix.to_owned();
    let _ = tokio::task::spawn_blocking(move || idem_support::redis::delete_prefix(&owned)).await;
    let Ok(mut con) = idem_support::redis::connect(&idem_support::redis::url()).await else {
        return usize::MAX;
    };
    use idempotency::redis::redis::AsyncCommands;
    let pattern = format!("*{prefix}*");
    let mut left = 0;
    match con.scan_match::<_, String>(&pattern).await {
        Ok(mut keys) => {
            use futures::StreamExt;
            while keys.next().await.is_some() {
                left += 1;
            }
        }
        Err(_) => return usize::MAX,
    }
    left
}

// ---------------------------------------------------------------------------------------------
// `--profile http-first|http-replay`

/// `--profile http-first` / `http-replay`: 20k requests through the `IdempotencyLayer`-wrapped
/// router on the memory store, called with `oneshot` (no sockets) on a current-thread runtime,
/// with deterministic keys, for `valgrind --tool=callgrind`.
pub(crate) fn profile(mode: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let starts = Arc::new(AtomicUsize::new(0));
        let handler = Handler {
            starts: starts.clone(),
            delay: Duration::ZERO,
        };
        let app = charge_app(handler).layer(idem_layer(unbounded_memory_store()));
        let call = |key: String, order: u64| {
            let app = app.clone();
            async move {
                let req = Request::post("/charge")
                    .header(header::CONTENT_TYPE, "application/json")
                    .header("idempotency-key", key)
                    .body(axum::body::Body::from(charge_body(order)))
                    .expect("a request");
                let res = app.oneshot(req).await.expect("infallible");
                assert_eq!(res.status(), StatusCode::OK);
                let replayed = res.headers().contains_key(IDEM_REPLAYED);
                let body = res.into_body().collect().await.expect("a body").to_bytes();
                std::hint::black_box(body);
                replayed
            }
        };
        assert!(!call("replay".into(), 7).await);
        for i in 0..20_000u64 {
            match mode {
                "first" => assert!(!call(format!("first-{i}"), 1_000_000 + i).await),
                "replay" => assert!(call("replay".into(), 7).await),
                other => panic!("unknown profile http-{other}"),
            }
        }
        let expected = if mode == "first" { 20_001 } else { 1 };
        assert_eq!(starts.load(Ordering::SeqCst), expected);
    });
}
