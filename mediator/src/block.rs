//! A mediated block device: clients call [`MediatedBlock::read_at`],
//! [`write_at`](MediatedBlock::write_at) and [`flush`](MediatedBlock::flush);
//! a driver picoprocess serves them; the mediator in between checks every
//! response against the block contract and survives the driver.
//!
//! One engine thread owns the contract and the driver connection. Each
//! driver incarnation has a reader thread (it decodes what the driver sends
//! and hands it to the engine, never trusting it) and a writer thread (so a
//! driver that stops reading cannot block the engine). When the driver
//! crashes, breaks the contract or misses a deadline, the engine kills it,
//! starts a new one, checks its geometry, and re-issues every request that
//! was in flight, in order, so each client request completes exactly once.
//! After [`Config::max_failed_restarts`] restarts in a row without a single
//! completed request, the circuit opens: pending and new requests fail
//! with an error saying so, until [`Config::retry_after`] has passed.
use crate::contract::{BlockContract, ClientError, Contract, ContractLimits, Geometry, Violation};
use crossbeam_channel::{select, unbounded, Receiver, Sender};
use moat_monitor::{Host, Killer, Picoprocess, Sandbox, Stdio};
use moat_policy::Policy;
use moat_service_proto::{op, status, DecodeError, Request, Response, HEADER, MAX_PAYLOAD};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The service pipe a block driver listens on (`pipe.server:moat-blk`).
pub const PIPE: &str = "moat-blk";

/// How to start the driver picoprocess.
#[derive(Debug, Clone)]
pub struct DriverSpec {
    pub image: PathBuf,
    /// The driver's arguments, naming the service pipe [`PIPE`] where
    /// the driver expects it.
    pub args: Vec<String>,
    pub host: Host,
    /// Grants and devices of the driver (the service pipe is added).
    pub policy: Policy,
    /// Driver faults to inject: incarnation `n` gets
    /// `SEED+n:PER_MILLION:KINDS` as its last argument.
    pub faults: Option<FaultPlan>,
    /// Where the driver's console goes (default: nowhere).
    pub console: bool,
}

/// Seeded driver faults (see `moat_libos::service::Faults`).
#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub seed: u64,
    pub per_million: u32,
    pub kinds: String,
}

/// Mediator settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// A request not answered within this ends the driver.
    pub deadline: Duration,
    /// A new driver must report its geometry within this (starting a
    /// picoprocess takes longer than answering a request).
    pub start_timeout: Duration,
    /// Bytes per request to the driver (client requests are split).
    pub max_io: u32,
    pub max_in_flight: usize,
    /// Restarts in a row, with no request completed in between, before
    /// the circuit opens.
    pub max_failed_restarts: u32,
    /// How long an open circuit fails requests before trying again.
    pub retry_after: Duration,
    /// Serve reads only: every write fails with `EROFS` before it reaches
    /// a driver.
    pub read_only: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            deadline: Duration::from_secs(2),
            start_timeout: Duration::from_secs(2),
            max_io: 256 << 10,
            max_in_flight: 64,
            max_failed_restarts: 5,
            retry_after: Duration::from_secs(1),
            read_only: false,
        }
    }
}

/// What the mediator has seen.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Client requests received (after splitting into requests of at most
    /// [`Config::max_io`] bytes). Once the device is shut down, every one
    /// of them is either `completed` or `failed`.
    pub submitted: u64,
    /// Requests sent to drivers (re-issues included).
    pub requests: u64,
    /// Client requests completed (once each).
    pub completed: u64,
    /// Client requests failed with an error.
    pub failed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Violations by kind (including `crash` and `deadline`).
    pub violations: BTreeMap<&'static str, u64>,
    /// Drivers started after the first.
    pub restarts: u64,
    /// Requests re-issued to a new driver.
    pub reissued: u64,
    /// Time from detecting a fault to a new driver ready, per recovery.
    pub recovery: Vec<Duration>,
    /// Times the circuit opened.
    pub circuit_opened: u64,
    /// Why the last driver start failed, if one did.
    pub last_start_failure: Option<String>,
    /// Driver starts that failed (did not come up, or no geometry).
    pub failed_starts: u64,
    /// Completions the contract let through for a request already
    /// answered to its client (must stay 0).
    pub duplicate_completions: u64,
}

impl Counters {
    /// A recovery-time percentile (0.0 to 1.0), if any recovery happened.
    pub fn recovery_percentile(&self, p: f64) -> Option<Duration> {
        if self.recovery.is_empty() {
            return None;
        }
        let mut v = self.recovery.clone();
        v.sort();
        let i = ((v.len() - 1) as f64 * p).round() as usize;
        Some(v[i])
    }

    pub fn faults(&self) -> u64 {
        self.violations.values().sum()
    }
}

type Reply = Sender<io::Result<Vec<u8>>>;

enum Cmd {
    Submit {
        op: u8,
        offset: u64,
        len: u32,
        data: Vec<u8>,
        reply: Reply,
    },
    /// Finish what is in flight (within the deadline), fail what is not,
    /// stop the driver.
    Shutdown,
}

enum FromDriver {
    Message(u64, Response, Vec<u8>),
    Malformed(u64, DecodeError),
    Closed(u64),
}

struct Incarnation {
    generation: u64,
    proc: Picoprocess,
    to_driver: Sender<Vec<u8>>,
}

/// A block device served by a driver picoprocess through the mediator.
/// Cheap to clone; every clone is the same device.
#[derive(Clone)]
pub struct MediatedBlock {
    cmd: Sender<Cmd>,
    geometry: Geometry,
    max_io: u32,
    read_only: bool,
    counters: Arc<Mutex<Counters>>,
    killer: Arc<Mutex<Option<Killer>>>,
    /// The engine thread, joined by the first [`MediatedBlock::shutdown`].
    engine: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn io_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl MediatedBlock {
    /// Start the driver, check its geometry, and serve.
    pub fn start(spec: DriverSpec, config: Config) -> io::Result<MediatedBlock> {
        let counters = Arc::new(Mutex::new(Counters::default()));
        let killer = Arc::new(Mutex::new(None));
        let mut engine = Engine {
            spec,
            limits: ContractLimits {
                max_io: config.max_io,
                deadline: config.deadline,
                max_in_flight: config.max_in_flight,
            },
            contract: BlockContract::new(ContractLimits {
                max_io: config.max_io,
                deadline: config.deadline,
                max_in_flight: config.max_in_flight,
            }),
            config,
            waiting: HashMap::new(),
            payloads: HashMap::new(),
            driver: None,
            generation: 0,
            incarnations: 0,
            from_driver: unbounded(),
            counters: counters.clone(),
            killer: killer.clone(),
            failed_restarts: 0,
            progress: false,
            circuit_open_until: None,
            queue: Vec::new(),
        };
        // The first start is retried like a restart: a driver that fails
        // its handshake gets the same number of chances.
        let mut tries = 0;
        let geometry = loop {
            match engine.start_driver() {
                Ok(g) => break g,
                Err(e) => {
                    tries += 1;
                    if let Some(mut d) = engine.driver.take() {
                        let _ = d.proc.kill();
                        let _ = d.proc.wait();
                    }
                    if tries > engine.config.max_failed_restarts {
                        return Err(e);
                    }
                }
            }
        };
        let (tx, rx) = unbounded();
        let max_io = engine.config.max_io;
        let read_only = engine.config.read_only;
        let thread = std::thread::Builder::new()
            .name("moat-mediator".into())
            .spawn(move || engine.run(rx))?;
        Ok(MediatedBlock {
            cmd: tx,
            geometry,
            max_io,
            read_only,
            counters,
            killer,
            engine: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn capacity(&self) -> u64 {
        self.geometry.capacity
    }

    pub fn block_size(&self) -> u32 {
        self.geometry.block_size
    }

    /// Whether writes are refused ([`Config::read_only`]).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn counters(&self) -> Counters {
        self.counters.lock().unwrap().clone()
    }

    /// Kill the current driver picoprocess (fault injection from
    /// outside: the mediator notices, as for any crash).
    pub fn kill_driver(&self) {
        if let Some(k) = &*self.killer.lock().unwrap() {
            k.kill();
        }
    }

    /// One client request. Every call is counted `submitted`, and ends
    /// counted `completed` or `failed`: by the engine when it answers, here
    /// when the engine is gone before it could.
    fn call(&self, op: u8, offset: u64, len: u32, data: Vec<u8>) -> io::Result<Vec<u8>> {
        let count = |f: fn(&mut Counters)| f(&mut self.counters.lock().unwrap());
        count(|c| c.submitted += 1);
        if self.read_only && op == op::WRITE {
            count(|c| c.failed += 1);
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let sent = self.cmd.send(Cmd::Submit {
            op,
            offset,
            len,
            data,
            reply: tx,
        });
        match sent.ok().and_then(|()| rx.recv().ok()) {
            Some(r) => r,
            None => {
                count(|c| c.failed += 1);
                Err(io_err("the mediator has shut down"))
            }
        }
    }

    /// Read `buf.len()` bytes at `offset` (both multiples of the block size).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.max_io as usize);
            let got = self.call(op::READ, offset + done as u64, n as u32, Vec::new())?;
            buf[done..done + n].copy_from_slice(&got);
            done += n;
        }
        Ok(())
    }

    /// Write `data` at `offset` (both multiples of the block size).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        for (i, chunk) in data.chunks(self.max_io as usize).enumerate() {
            let off = offset + (i * self.max_io as usize) as u64;
            self.call(op::WRITE, off, chunk.len() as u32, chunk.to_vec())?;
        }
        Ok(())
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.call(op::FLUSH, 0, 0, Vec::new()).map(|_| ())
    }

    /// Stop: requests in flight are finished (given up to the deadline),
    /// requests not yet sent fail, the driver is ended. Returns once all of
    /// that is done; later calls return at once. Bounded: the deadline plus
    /// ending the driver.
    pub fn shutdown(&self) {
        let _ = self.cmd.send(Cmd::Shutdown);
        let engine = self.engine.lock().unwrap().take();
        if let Some(t) = engine {
            let _ = t.join();
        }
    }
}

struct Engine {
    spec: DriverSpec,
    limits: ContractLimits,
    config: Config,
    contract: BlockContract,
    /// Client replies by request id.
    waiting: HashMap<u64, Reply>,
    /// Write payloads by request id, kept until completion (re-issue).
    payloads: HashMap<u64, Vec<u8>>,
    driver: Option<Incarnation>,
    generation: u64,
    incarnations: u64,
    from_driver: (Sender<FromDriver>, Receiver<FromDriver>),
    counters: Arc<Mutex<Counters>>,
    killer: Arc<Mutex<Option<Killer>>>,
    /// Restarts in a row that brought no progress: the new driver did not
    /// come up, or failed again with work pending and none completed.
    failed_restarts: u32,
    /// The current driver completed a request since it started.
    progress: bool,
    circuit_open_until: Option<Instant>,
    /// Client requests waiting for room (max in flight) or a driver.
    queue: Vec<Cmd>,
}

impl Engine {
    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.counters.lock().unwrap());
    }

    /// Start a driver incarnation and check its geometry (first start: any
    /// valid geometry; restarts: the same one).
    fn start_driver(&mut self) -> io::Result<Geometry> {
        self.generation += 1;
        let generation = self.generation;
        let mut args = self.spec.args.clone();
        if let Some(f) = &self.spec.faults {
            args.push(format!(
                "{}:{}:{}",
                f.seed.wrapping_add(self.incarnations),
                f.per_million,
                f.kinds
            ));
        }
        self.incarnations += 1;
        let mut policy = self.spec.policy.clone();
        policy
            .allow(&format!("pipe.server:{PIPE}"), moat_policy::Access::Rw)
            .map_err(|e| io_err(e.to_string()))?;
        let console = if self.spec.console {
            Stdio::Inherit
        } else {
            Stdio::Null
        };
        let mut sb = Sandbox::new(&self.spec.image)
            .args(args)
            .policy(policy)
            .host(self.spec.host)
            .stdin(Stdio::Null)
            .stdout(console)
            .stderr(console);
        if !self.spec.console {
            sb = sb.log(moat_monitor::LogSink::Callback(Arc::new(|_| {})));
        }
        let proc = sb
            .spawn()
            .map_err(|e| io_err(format!("cannot start the driver: {e}")))?;
        *self.killer.lock().unwrap() = Some(proc.killer());
        let conn = proc
            .connect_pipe(PIPE)
            .map_err(|e| io_err(format!("cannot connect to the driver: {e}")))?;
        let rd = conn.try_clone()?;
        // Writer: the engine never blocks on a driver that stops reading.
        let (to_driver, outq) = unbounded::<Vec<u8>>();
        let mut wr = conn;
        std::thread::Builder::new()
            .name("moat-mediator-w".into())
            .spawn(move || {
                for msg in outq {
                    if wr.write_all(&msg).is_err() {
                        return;
                    }
                }
                let _ = wr.shutdown(std::net::Shutdown::Both);
            })?;
        let tx = self.from_driver.0.clone();
        std::thread::Builder::new()
            .name("moat-mediator-r".into())
            .spawn(move || read_driver(generation, rd, tx))?;
        self.driver = Some(Incarnation {
            generation,
            proc,
            to_driver,
        });
        // The handshake: geometry first, within the deadline.
        let info = self.contract.info_request();
        self.send(&info, &[]);
        let deadline = Instant::now() + self.config.start_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = self
                .from_driver
                .1
                .recv_timeout(left)
                .map_err(|_| io_err("the driver did not report its geometry in time"))?;
            match msg {
                FromDriver::Message(g, resp, payload) if g == generation => {
                    return self
                        .contract
                        .check_info(&resp, &payload)
                        .map_err(|v| io_err(format!("driver handshake: {v}")));
                }
                FromDriver::Malformed(g, e) if g == generation => {
                    return Err(io_err(format!(
                        "driver handshake: malformed message: {e:?}"
                    )))
                }
                FromDriver::Closed(g) if g == generation => {
                    return Err(io_err("the driver ended before reporting its geometry"))
                }
                _ => {} // an old incarnation's last words
            }
        }
    }

    fn send(&self, req: &Request, payload: &[u8]) {
        if let Some(d) = &self.driver {
            let mut msg = Vec::with_capacity(HEADER + payload.len());
            msg.extend_from_slice(&req.encode());
            msg.extend_from_slice(payload);
            let _ = d.to_driver.send(msg);
        }
    }

    fn run(mut self, cmds: Receiver<Cmd>) {
        let tick = Duration::from_millis(5);
        // Once shutting down: requests in flight get until then to finish.
        let mut draining: Option<Instant> = None;
        // Every client handle gone: nothing more can come.
        let mut cmds = cmds;
        loop {
            if let Some(until) = draining {
                if self.waiting.is_empty() || Instant::now() >= until {
                    break;
                }
            }
            let from = self.from_driver.1.clone();
            select! {
                recv(cmds) -> c => match c {
                    Ok(Cmd::Shutdown) | Err(_) => {
                        if c.is_err() {
                            cmds = crossbeam_channel::never();
                        }
                        if draining.is_none() {
                            draining = Some(Instant::now() + self.config.deadline);
                            self.fail_queued("the mediator is shutting down");
                        }
                    }
                    Ok(c) if draining.is_some() => {
                        self.queue.push(c);
                        self.fail_queued("the mediator is shutting down");
                    }
                    Ok(c) => { self.queue.push(c); self.pump(); }
                },
                recv(from) -> m => if let Ok(m) = m { self.on_driver(m) },
                default(tick) => {}
            }
            if let Some(id) = self.contract.expired(Instant::now()) {
                self.recover(Violation::Deadline, Some(id));
            }
            if self.circuit_open_until.is_some_and(|t| Instant::now() >= t) {
                self.circuit_open_until = None;
                self.failed_restarts = 0;
                if self.driver.is_none() {
                    self.recover_start();
                }
            }
            self.pump();
        }
        if let Some(mut d) = self.driver.take() {
            let _ = d.proc.kill();
            let _ = d.proc.wait();
        }
        *self.killer.lock().unwrap() = None;
        let n = self.waiting.len() as u64;
        for (_, r) in self.waiting.drain() {
            let _ = r.send(Err(io_err(
                "the mediator shut down before the driver answered",
            )));
        }
        self.count(|c| c.failed += n);
        // Whatever arrived after the last look fails too (counted by the
        // client side when the channel closes unanswered).
        self.fail_queued("the mediator has shut down");
    }

    /// Fail every queued client request (counted).
    fn fail_queued(&mut self, why: &str) {
        let mut n = 0;
        for c in self.queue.drain(..) {
            if let Cmd::Submit { reply, .. } = c {
                let _ = reply.send(Err(io_err(why)));
                n += 1;
            }
        }
        self.count(|c| c.failed += n);
    }

    /// Issue queued client requests while there is room and a driver.
    fn pump(&mut self) {
        if self.circuit_open_until.is_some() {
            let n = self.queue.len() as u64;
            for c in self.queue.drain(..) {
                if let Cmd::Submit { reply, .. } = c {
                    let _ = reply.send(Err(io_err(format!(
                        "the driver failed {} restarts in a row; the mediator is not retrying yet",
                        self.config.max_failed_restarts
                    ))));
                }
            }
            self.count(|c| c.failed += n);
            return;
        }
        if self.driver.is_none() {
            return;
        }
        let mut keep = Vec::new();
        for c in std::mem::take(&mut self.queue) {
            let Cmd::Submit {
                op: o,
                offset,
                len,
                data,
                reply,
            } = c
            else {
                continue;
            };
            if let Err(e) = self.contract.check_client(o, offset, len) {
                let _ = reply.send(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    e.to_string(),
                )));
                self.count(|c| c.failed += 1);
                continue;
            }
            match self.contract.issue(o, offset, len, Instant::now()) {
                Ok(mut req) => {
                    req.payload = if o == op::WRITE { len } else { 0 };
                    self.send(&req, &data);
                    self.waiting.insert(req.id, reply);
                    if o == op::WRITE {
                        self.payloads.insert(req.id, data);
                    }
                    self.count(|c| c.requests += 1);
                }
                Err(ClientError::Busy) => keep.push(Cmd::Submit {
                    op: o,
                    offset,
                    len,
                    data,
                    reply,
                }),
                Err(e) => {
                    let _ = reply.send(Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        e.to_string(),
                    )));
                    self.count(|c| c.failed += 1);
                }
            }
        }
        self.queue = keep;
    }

    fn on_driver(&mut self, m: FromDriver) {
        let current = self.driver.as_ref().map(|d| d.generation);
        match m {
            FromDriver::Message(g, resp, payload) if Some(g) == current => {
                match self.contract.check_response(&resp, Instant::now()) {
                    Ok(done) => {
                        self.failed_restarts = 0;
                        self.progress = true;
                        self.payloads.remove(&done.id);
                        let Some(reply) = self.waiting.remove(&done.id) else {
                            self.count(|c| c.duplicate_completions += 1);
                            return;
                        };
                        if done.status == status::OK {
                            let n = payload.len() as u64;
                            let w = if done.op == op::WRITE {
                                done.len as u64
                            } else {
                                0
                            };
                            self.count(|c| {
                                c.completed += 1;
                                c.bytes_read += n;
                                c.bytes_written += w;
                            });
                            let _ = reply.send(Ok(payload));
                        } else {
                            self.count(|c| c.failed += 1);
                            let _ = reply.send(Err(io_err(format!(
                                "the driver reported status {} for request {}",
                                done.status, done.id
                            ))));
                        }
                    }
                    Err(v) => self.recover(v, None),
                }
            }
            FromDriver::Malformed(g, e) if Some(g) == current => {
                self.recover(Violation::BadHeader(e), None)
            }
            FromDriver::Closed(g) if Some(g) == current => self.recover_crash(),
            _ => {}
        }
    }

    fn recover_crash(&mut self) {
        self.count(|c| *c.violations.entry("crash").or_insert(0) += 1);
        self.restart();
    }

    fn recover(&mut self, v: Violation, _id: Option<u64>) {
        let kind = v.kind();
        self.count(|c| *c.violations.entry(kind).or_insert(0) += 1);
        self.restart();
    }

    /// End the current driver, start a new one, re-issue what was in flight.
    fn restart(&mut self) {
        let t0 = Instant::now();
        // A driver that failed with nothing to do, or after completing
        // something, is no sign of a request that kills every driver.
        if self.progress || self.contract.in_flight_len() == 0 {
            self.failed_restarts = 0;
        } else {
            self.failed_restarts += 1;
        }
        if let Some(mut d) = self.driver.take() {
            let _ = d.proc.kill();
            // Reap it off the engine thread.
            std::thread::spawn(move || {
                let _ = d.proc.wait();
            });
        }
        *self.killer.lock().unwrap() = None;
        self.recover_start_at(t0);
    }

    fn recover_start(&mut self) {
        self.recover_start_at(Instant::now());
    }

    fn recover_start_at(&mut self, t0: Instant) {
        loop {
            if self.failed_restarts >= self.config.max_failed_restarts {
                self.open_circuit();
                return;
            }
            self.count(|c| c.restarts += 1);
            let t = Instant::now();
            match self.start_driver() {
                Ok(_) => break,
                Err(e) => {
                    let why = format!("{e} (after {:?})", t.elapsed());
                    self.count(|c| {
                        c.failed_starts += 1;
                        c.last_start_failure = Some(why);
                    });
                    self.failed_restarts += 1;
                    if let Some(mut d) = self.driver.take() {
                        let _ = d.proc.kill();
                        std::thread::spawn(move || {
                            let _ = d.proc.wait();
                        });
                    }
                    // Back off a little before the next attempt.
                    std::thread::sleep(Duration::from_millis(10u64 << self.failed_restarts.min(6)));
                }
            }
        }
        self.progress = false;
        let again = self.contract.reissue(Instant::now());
        let n = again.len() as u64;
        for mut req in again {
            let data = self.payloads.get(&req.id).cloned().unwrap_or_default();
            req.payload = data.len() as u32;
            self.send(&req, &data);
        }
        let took = t0.elapsed();
        self.count(|c| {
            c.reissued += n;
            c.requests += n;
            c.recovery.push(took);
        });
    }

    fn open_circuit(&mut self) {
        self.circuit_open_until = Some(Instant::now() + self.config.retry_after);
        let ids = self.contract.fail_all();
        let n = ids.len() as u64;
        for id in ids {
            self.payloads.remove(&id);
            if let Some(r) = self.waiting.remove(&id) {
                let _ = r.send(Err(io_err(format!(
                    "the driver failed {} restarts in a row",
                    self.config.max_failed_restarts
                ))));
            }
        }
        self.count(|c| {
            c.failed += n;
            c.circuit_opened += 1;
        });
        let _ = &self.limits;
    }
}

/// Read what one driver incarnation sends: header, then a bounded payload.
fn read_driver(generation: u64, mut s: UnixStream, tx: Sender<FromDriver>) {
    loop {
        let mut h = [0u8; HEADER];
        if s.read_exact(&mut h).is_err() {
            let _ = tx.send(FromDriver::Closed(generation));
            return;
        }
        let resp = match Response::decode(&h) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(FromDriver::Malformed(generation, e));
                return;
            }
        };
        debug_assert!(resp.len <= MAX_PAYLOAD);
        let mut payload = vec![0u8; resp.len as usize];
        if s.read_exact(&mut payload).is_err() {
            let _ = tx.send(FromDriver::Closed(generation));
            return;
        }
        if tx
            .send(FromDriver::Message(generation, resp, payload))
            .is_err()
        {
            return;
        }
    }
}
