//! A fixed-rate HTTP/1.1 client for latency at a given load
//! (`bench/proxies.sh`, mode `rate`).
//!
//!   paced-client ADDR PATH RATE CONNS SECONDS
//!
//! Each of CONNS keep-alive connections has its own thread and its own
//! schedule (RATE/CONNS requests a second, evenly spaced, the connections'
//! schedules offset from each other), so the offered load is smooth: no
//! bursts from a shared tick, which is what made h2load's `--rps` p99
//! reflect its own pacing more than the proxy's latency. A request's latency
//! is counted from its scheduled send time (so a slow answer that delays
//! the next send is charged to the proxy, not hidden) to the last byte of
//! the answer. Prints one line:
//!
//!   requests N errors E late L p50 MS p90 MS p99 MS p999 MS max MS
//!
//! `late`: sends that left more than a millisecond after their scheduled
//! time (the client or the proxy fell behind; the numbers then mean less).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(path), Some(rate), Some(conns), Some(secs)) = (
        args.get(1),
        args.get(2),
        args.get(3).and_then(|r| r.parse::<f64>().ok()),
        args.get(4).and_then(|c| c.parse::<u32>().ok()),
        args.get(5).and_then(|s| s.parse::<f64>().ok()),
    ) else {
        eprintln!("usage: paced-client ADDR PATH RATE CONNS SECONDS");
        std::process::exit(2);
    };
    if rate <= 0.0 || conns == 0 || secs <= 0.0 {
        eprintln!("RATE, CONNS and SECONDS must be positive");
        std::process::exit(2);
    }
    // The default timer slack (50 µs) would be added to every wake-up.
    // SAFETY: prctl with PR_SET_TIMERSLACK takes a plain integer.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    let period = Duration::from_secs_f64(f64::from(conns) / rate);
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(secs);
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: paced-client\r\n\r\n");
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let addr = addr.clone();
            let request = request.clone();
            let offset = period.mul_f64(f64::from(i) / f64::from(conns));
            std::thread::spawn(move || run(&addr, request.as_bytes(), start + offset, period, end))
        })
        .collect();
    let (mut all, mut errors, mut late) = (Vec::new(), 0u64, 0u64);
    for t in threads {
        match t.join() {
            Ok(r) => {
                all.extend(r.latencies);
                errors += r.errors;
                late += r.late;
            }
            Err(_) => errors += 1,
        }
    }
    all.sort_unstable();
    let q = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64) * p) as usize;
        all[i.min(all.len() - 1)].as_secs_f64() * 1e3
    };
    println!(
        "requests {} errors {errors} late {late} p50 {:.3} p90 {:.3} p99 {:.3} p999 {:.3} max {:.3}",
        all.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        all.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
}

struct Run {
    latencies: Vec<Duration>,
    errors: u64,
    late: u64,
}

fn run(addr: &str, request: &[u8], first: Instant, period: Duration, end: Instant) -> Run {
    let mut out = Run {
        latencies: Vec::new(),
        errors: 0,
        late: 0,
    };
    let mut conn: Option<TcpStream> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut due = first;
    while due < end {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else if now - due > Duration::from_millis(1) {
            out.late += 1;
        }
        if conn.is_none() {
            conn = TcpStream::connect(addr).ok().inspect(|s| {
                let _ = s.set_nodelay(true);
            });
        }
        let ok = match conn.as_mut() {
            Some(s) => exchange(s, request, &mut buf).is_ok(),
            None => false,
        };
        if ok {
            out.latencies.push(due.elapsed());
        } else {
            out.errors += 1;
            conn = None;
        }
        due += period;
    }
    out
}

/// One request and its whole answer (content-length or chunked).
fn exchange(s: &mut TcpStream, request: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    s.write_all(request)?;
    let mut have = 0usize;
    let head_end = loop {
        let n = s.read(buf.get_mut(have..).ok_or_else(|| bad("head too large"))?)?;
        if n == 0 {
            return Err(bad("closed"));
        }
        have += n;
        if let Some(i) = find(&buf[..have], b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(bad("not 200"));
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(len) => {
            let mut body = have - head_end;
            while body < len {
                let n = s.read(buf)?;
                if n == 0 {
                    return Err(bad("closed mid-body"));
                }
                body += n;
            }
        }
        None => {
            // chunked: read until the last chunk's terminator
            let mut tail = buf[head_end..have].to_vec();
            while find(&tail, b"0\r\n\r\n").is_none() {
                let n = s.read(buf)?;
                if n == 0 {
                    return Err(bad("closed mid-body"));
                }
                tail.extend_from_slice(&buf[..n]);
            }
        }
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
