//! The faults tests' and the soak's load client: many TCP connections to an echo server (through
//! beamredir's redirect when run in a session with `beamredir exec`), each checked byte for byte.
//! It prints JSON (one object per line) for the caller to parse.
//!
//! * `burst --addr A --conns N --bytes B`: opens N connections at once, waits until every connect
//!   has returned, then each sends B pseudo-random bytes, reads them back and compares. Prints a
//!   summary: ok, lost (by what happened), corrupted, latencies.
//! * `hold --addr A --conns N [--probe B] [--give-up-ms G] [--wait-ms W]`: opens N connections,
//!   echoes B bytes on each (0: none), prints `{"ready":…}`, then waits for each to be ended by
//!   the other side (or gives up after G ms, or stops waiting after W ms). Prints when and how each
//!   ended (unix ms).
//! * `loop --addr A --workers W --rate R --bytes B --duration-ms D`: W workers open at most R
//!   connections a second in all, each an echo of B bytes, for D ms. Prints a line per second
//!   (`{"t":…,"ok":…,"fail":…,"corrupt":…}`) and a summary.
//!
//! Each connection has its own seed, so a byte delivered to the wrong connection is a corruption.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Deterministic bytes for connection `seed` (xorshift64*).
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// How one echo went.
#[derive(Debug)]
enum Outcome {
    Ok,
    Corrupted,
    /// Lost, with what happened (connect failed, reset, early EOF after n bytes, timeout).
    Lost(String),
}

/// One echo on an open connection: send `data`, read as much back, compare.
async fn echo(stream: TcpStream, data: &[u8], io_timeout: Duration) -> Outcome {
    let (mut rd, mut wr) = stream.into_split();
    let len = data.len();
    let send = async {
        wr.write_all(data).await?;
        Ok::<_, std::io::Error>(wr)
    };
    let recv = async {
        let mut back = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match rd.read(&mut back[got..]).await {
                Ok(0) => return Err(format!("early EOF after {got} bytes")),
                Ok(n) => got += n,
                Err(e) => return Err(format!("read: {}", kind(&e))),
            }
        }
        Ok(back)
    };
    let both = async { tokio::join!(send, recv) };
    match tokio::time::timeout(io_timeout, both).await {
        Err(_) => Outcome::Lost("timeout".into()),
        Ok((_, Err(e))) => Outcome::Lost(e),
        Ok((Err(e), Ok(_))) => Outcome::Lost(format!("write: {}", kind(&e))),
        Ok((Ok(_wr), Ok(back))) if back == data => Outcome::Ok,
        Ok((Ok(_), Ok(_))) => Outcome::Corrupted,
    }
}

fn kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EPIPE) => "broken pipe".into(),
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ENETUNREACH) => "network unreachable".into(),
        _ => e.kind().to_string(),
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err("connect: timeout".into()),
        Ok(Err(e)) => Err(format!("connect: {}", kind(&e))),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Args(BTreeMap<String, String>);

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Self {
        let mut map = BTreeMap::new();
        let mut it = args.peekable();
        while let Some(a) = it.next() {
            if let Some(k) = a.strip_prefix("--") {
                let v = it.next_if(|v| !v.starts_with("--")).unwrap_or_default();
                map.insert(k.to_string(), v);
            }
        }
        Args(map)
    }
    fn addr(&self) -> SocketAddr {
        self.0
            .get("addr")
            .and_then(|a| a.parse().ok())
            .expect("--addr IP:PORT")
    }
    fn num(&self, k: &str, default: u64) -> u64 {
        self.0
            .get(k)
            .map(|v| v.parse().unwrap_or_else(|_| panic!("--{k}: not a number")))
            .unwrap_or(default)
    }
}

/// Raises the soft limit on open files to the hard limit (thousands of sockets).
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn main() {
    raise_fd_limit();
    let mut argv = std::env::args().skip(1);
    let mode = argv.next().unwrap_or_default();
    let args = Args::parse(argv);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let summary = rt.block_on(async {
        match mode.as_str() {
            "burst" => burst(&args).await,
            "hold" => hold(&args).await,
            "loop" => run_loop(&args).await,
            _ => panic!("usage: beamredir-load burst|hold|loop --addr IP:PORT …"),
        }
    });
    println!("{summary}");
    rt.shutdown_timeout(Duration::from_millis(100));
}

async fn burst(args: &Args) -> serde_json::Value {
    let addr = args.addr();
    let conns = args.num("conns", 1000) as usize;
    let bytes = args.num("bytes", 64 * 1024) as usize;
    let connect_timeout = Duration::from_millis(args.num("connect-timeout-ms", 30_000));
    let io_timeout = Duration::from_millis(args.num("io-timeout-ms", 120_000));
    let barrier = Arc::new(tokio::sync::Barrier::new(conns));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let stream = connect(addr, connect_timeout).await;
            // Every connection is open (or failed) before any of them sends: N at once.
            barrier.wait().await;
            let t = Instant::now();
            let outcome = match stream {
                Err(e) => Outcome::Lost(e),
                Ok(s) => echo(s, &payload(i as u64 + 1, bytes), io_timeout).await,
            };
            (outcome, t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let (mut ok, mut corrupted) = (0u64, 0u64);
    let mut lost: BTreeMap<String, u64> = BTreeMap::new();
    let mut latencies = Vec::new();
    for t in tasks {
        match t.await {
            Ok((Outcome::Ok, ms)) => {
                ok += 1;
                latencies.push(ms);
            }
            Ok((Outcome::Corrupted, _)) => corrupted += 1,
            Ok((Outcome::Lost(why), _)) => *lost.entry(why).or_default() += 1,
            Err(e) => *lost.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    json!({
        "conns": conns, "bytes": bytes, "ok": ok, "corrupted": corrupted,
        "lost": lost.values().sum::<u64>(), "lost_by": lost,
        "p50_ms": percentile(&latencies, 0.5), "p99_ms": percentile(&latencies, 0.99),
        "max_ms": latencies.last().copied().unwrap_or(0.0),
        "elapsed_ms": started.elapsed().as_millis() as u64,
    })
}

async fn hold(args: &Args) -> serde_json::Value {
    let addr = args.addr();
    let conns = args.num("conns", 10) as usize;
    let probe = args.num("probe", 1024) as usize;
    let give_up = args
        .0
        .get("give-up-ms")
        .map(|_| Duration::from_millis(args.num("give-up-ms", 0)));
    let wait = Duration::from_millis(args.num("wait-ms", 120_000));
    let mut streams = Vec::new();
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..conns {
        let s = match connect(addr, Duration::from_secs(30)).await {
            Ok(s) => s,
            Err(e) => {
                *failed.entry(e).or_default() += 1;
                continue;
            }
        };
        if probe > 0 {
            // An echo first, so the connection is carried end to end before the wait.
            let data = payload(i as u64 + 1, probe);
            let mut s = s;
            let mut back = vec![0u8; probe];
            let r = tokio::time::timeout(Duration::from_secs(60), async {
                s.write_all(&data).await?;
                s.read_exact(&mut back).await?;
                Ok::<_, std::io::Error>(())
            })
            .await;
            match r {
                Ok(Ok(())) if back == data => streams.push(s),
                Ok(Ok(())) => *failed.entry("probe corrupted".into()).or_default() += 1,
                Ok(Err(e)) => *failed.entry(format!("probe: {}", kind(&e))).or_default() += 1,
                Err(_) => *failed.entry("probe: timeout".into()).or_default() += 1,
            }
        } else {
            streams.push(s);
        }
    }
    println!(
        "{}",
        json!({"ready": true, "open": streams.len(), "failed": failed, "t": unix_ms()})
    );
    let started = Instant::now();
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let read = async {
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => return "eof".to_string(),
                            Ok(_) => continue,
                            Err(e) => return kind(&e),
                        }
                    }
                };
                let limit = give_up.unwrap_or(wait).min(wait);
                let how = match tokio::time::timeout(limit, read).await {
                    Ok(how) => how,
                    Err(_) if give_up.is_some() => "gave up".to_string(),
                    Err(_) => "still open".to_string(),
                };
                (how, unix_ms(), started.elapsed().as_millis() as u64)
            })
        })
        .collect();
    let mut ended: BTreeMap<String, u64> = BTreeMap::new();
    let mut after_ms = Vec::new();
    let mut at = Vec::new();
    for t in tasks {
        if let Ok((how, t, after)) = t.await {
            *ended.entry(how).or_default() += 1;
            at.push(t);
            after_ms.push(after);
        }
    }
    after_ms.sort();
    json!({
        "held": after_ms.len(), "failed": failed, "ended_by": ended,
        "first_end_unix_ms": at.iter().min(), "last_end_unix_ms": at.iter().max(),
        "min_after_ms": after_ms.first(), "max_after_ms": after_ms.last(),
    })
}

async fn run_loop(args: &Args) -> serde_json::Value {
    let addr = args.addr();
    let workers = args.num("workers", 8);
    let rate = args.num("rate", 20).max(1);
    let bytes = args.num("bytes", 4096) as usize;
    let duration = Duration::from_millis(args.num("duration-ms", 10_000));
    let io_timeout = Duration::from_millis(args.num("io-timeout-ms", 10_000));
    let (ok, fail, corrupt) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let end = Instant::now() + duration;
    // A token per connection, R a second, shared by the workers.
    let (tokens_tx, tokens_rx) = async_channel(rate as usize);
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        while Instant::now() < end {
            tick.tick().await;
            if tokens_tx.send(()).await.is_err() {
                break;
            }
        }
    });
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (ok, fail, corrupt, errors, rx, next) = (
            ok.clone(),
            fail.clone(),
            corrupt.clone(),
            errors.clone(),
            tokens_rx.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while rx.lock().await.recv().await.is_some() {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                let outcome = match connect(addr, io_timeout).await {
                    Err(e) => Outcome::Lost(e),
                    Ok(s) => echo(s, &payload(seed, bytes), io_timeout).await,
                };
                match outcome {
                    Outcome::Ok => ok.fetch_add(1, Ordering::Relaxed),
                    Outcome::Corrupted => corrupt.fetch_add(1, Ordering::Relaxed),
                    Outcome::Lost(why) => {
                        *errors.lock().unwrap().entry(why).or_default() += 1;
                        fail.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // One line a second: what completed in that second.
    let (mut last_ok, mut last_fail, mut last_corrupt) = (0, 0, 0);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.tick().await;
    while Instant::now() < end {
        second.tick().await;
        let (o, f, c) = (
            ok.load(Ordering::Relaxed),
            fail.load(Ordering::Relaxed),
            corrupt.load(Ordering::Relaxed),
        );
        println!(
            "{}",
            json!({"t": unix_ms(), "ok": o - last_ok, "fail": f - last_fail, "corrupt": c - last_corrupt})
        );
        (last_ok, last_fail, last_corrupt) = (o, f, c);
    }
    let _ = ticker.await;
    for t in tasks {
        let _ = t.await;
    }
    let errors = errors.lock().unwrap().clone();
    json!({
        "done": true, "ok": ok.load(Ordering::Relaxed), "fail": fail.load(Ordering::Relaxed),
        "corrupt": corrupt.load(Ordering::Relaxed), "errors": errors,
    })
}

/// A bounded multi-consumer channel of tokens (tokio's mpsc receiver behind a mutex).
#[allow(clippy::type_complexity)]
fn async_channel(
    cap: usize,
) -> (
    tokio::sync::mpsc::Sender<()>,
    Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<()>>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap);
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}
