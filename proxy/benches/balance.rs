//! Balancer pick cost: every algorithm over 3 and 1000 endpoints, each
//! endpoint with a latency sample (so peak-EWMA does its real work), keyed
//! picks for the consistent-hash balancers. Baseline: `round_robin`, one
//! relaxed atomic add.
//!
//! Run: `cargo bench -p wasp --bench balance`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use wasp::config::Balance;
use wasp::upstream::balance::{
    for_cluster, now_nanos, Candidate, Load, Neutral, PickContext, Tuning,
};

fn candidates(n: usize) -> Vec<Candidate> {
    let neutral = Arc::new(Neutral::default());
    let now = now_nanos();
    (0..n)
        .map(|i| {
            let load = Arc::new(Load::new(neutral.clone()));
            load.start();
            load.finish(1e6 + (i % 7) as f64 * 1e5, Duration::from_secs(10), now);
            Candidate {
                addr: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
                weight: 1 + (i % 3) as u32,
                load,
            }
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let kinds = [
        ("round_robin", Balance::RoundRobin),
        ("random", Balance::Random),
        ("least_request", Balance::LeastRequest),
        ("peak_ewma", Balance::PeakEwma),
        ("ring_hash", Balance::RingHash),
        ("maglev", Balance::Maglev),
    ];
    let mut group = c.benchmark_group("balance_pick");
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    for n in [3usize, 1000] {
        for (name, kind) in kinds {
            let b = for_cluster(kind, candidates(n), Tuning::default());
            let keys: Vec<String> = (0..1024).map(|i| format!("user-{i}")).collect();
            let mut k = 0usize;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |bench, _| {
                bench.iter(|| {
                    k = (k + 1) & 1023;
                    let ctx = PickContext {
                        hash_key: Some(keys[k].as_bytes()),
                    };
                    std::hint::black_box(b.pick(&ctx))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
