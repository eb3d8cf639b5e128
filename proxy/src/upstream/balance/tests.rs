//! The balancer math, without sockets or a runtime.

use std::time::Duration;

use super::test_util::{cands, counts};
use super::*;

#[test]
fn peak_ewma_jumps_up_and_decays_down() {
    let decay = Duration::from_secs(10);
    let s = 1_000_000_000u64;
    // Unknown: the first sample is taken as is.
    assert_eq!(peak_ewma_update(f64::NAN, 0, 5e6, s, decay), 5e6);
    // Slower sample: jump.
    assert_eq!(peak_ewma_update(5e6, s, 50e6, s + 1, decay), 50e6);
    // Faster sample right away: almost no change.
    let v = peak_ewma_update(50e6, s, 1e6, s + 1_000, decay);
    assert!(v > 49.9e6, "{v}");
    // Faster sample one time constant later: 1/e of the way left.
    let v = peak_ewma_update(50e6, s, 1e6, s + 10 * s, decay);
    let expect = 50e6 * (-1f64).exp() + 1e6 * (1.0 - (-1f64).exp());
    assert!((v - expect).abs() < 1.0, "{v} vs {expect}");
}

#[test]
fn estimate_decays_toward_zero_while_idle() {
    let neutral = Arc::new(Neutral::default());
    let load = Load::new(neutral);
    let decay = Duration::from_millis(100);
    assert_eq!(
        load.estimate(0, decay),
        1e6,
        "no sample: the neutral default"
    );
    load.start();
    load.finish(50e6, decay, 1_000);
    assert!(load.known());
    assert_eq!(load.in_flight(), 0);
    assert!((load.estimate(1_000, decay) - 50e6).abs() < 1.0);
    let later = load.estimate(1_000 + 300_000_000, decay);
    assert!(later < 50e6 * 0.06, "three time constants later: {later}");
}

#[test]
fn peak_ewma_avoids_the_slow_endpoint() {
    let c = cands(&[1, 1, 1]);
    let decay = Duration::from_secs(10);
    let now = now_nanos();
    c[0].load.finish(1e6, decay, now);
    c[1].load.finish(1e6, decay, now);
    c[2].load.finish(50e6, decay, now);
    let b = PeakEwma::new(c, decay);
    let n = counts(&b, 3000, 3);
    assert_eq!(n[2], 0, "the slow endpoint loses every comparison: {n:?}");
    assert!(n[0] > 1000 && n[1] > 1000, "{n:?}");
}

#[test]
fn peak_ewma_spreads_by_load() {
    let c = cands(&[1, 1]);
    let decay = Duration::from_secs(10);
    let now = now_nanos();
    c[0].load.finish(1e6, decay, now);
    c[1].load.finish(2e6, decay, now);
    // Endpoint 0 is faster but busy: 1 ms × 4 > 2 ms × 1.
    for _ in 0..3 {
        c[0].load.start();
    }
    let b = PeakEwma::new(c, decay);
    assert_eq!(b.pick(&PickContext::default()), Some(1));
}

#[test]
fn least_request_prefers_idle() {
    let c = cands(&[1, 1]);
    c[0].load.start();
    let b = LeastRequest::new(c);
    assert!((0..50).all(|_| b.pick(&PickContext::default()) == Some(1)));
}

#[test]
fn random_follows_weights() {
    let b = Random::new(&cands(&[1, 3, 0]));
    let n = counts(&b, 40_000, 3);
    assert_eq!(n[2], 0);
    let share = n[1] as f64 / 40_000.0;
    assert!((share - 0.75).abs() < 0.02, "{n:?}");
}

#[test]
fn weighted_p2c_follows_weights_when_idle() {
    let b = LeastRequest::new(cands(&[1, 4]));
    let n = counts(&b, 20_000, 2);
    assert!(n[1] > n[0] * 3, "{n:?}");
}

fn keyed(b: &dyn Balancer, key: &str) -> usize {
    b.pick(&PickContext {
        hash_key: Some(key.as_bytes()),
    })
    .unwrap()
}

fn consistent_hash_checks(make: fn(&[Candidate]) -> Box<dyn Balancer>) {
    let all = cands(&[1, 1, 1, 1]);
    let b = make(&all);
    // Same key, same endpoint.
    for k in 0..100 {
        let key = format!("user-{k}");
        assert_eq!(keyed(&*b, &key), keyed(&*b, &key));
    }
    // Keys spread over every endpoint.
    let mut n = [0usize; 4];
    for k in 0..4000 {
        n[keyed(&*b, &format!("user-{k}"))] += 1;
    }
    assert!(n.iter().all(|c| *c > 600), "{n:?}");
    // Removing endpoint 3 only moves the keys it had.
    let fewer = make(&all[..3]);
    let mut moved = 0;
    for k in 0..4000 {
        let key = format!("user-{k}");
        let before = keyed(&*b, &key);
        let after = keyed(&*fewer, &key);
        if before != 3 && before != after {
            moved += 1;
        }
    }
    assert!(moved < 200, "{moved} keys moved that did not have to");
    // Weights: 3:1.
    let w = make(&cands(&[3, 1]));
    let mut n = [0usize; 2];
    for k in 0..8000 {
        n[keyed(&*w, &format!("k{k}"))] += 1;
    }
    let share = n[0] as f64 / 8000.0;
    assert!((share - 0.75).abs() < 0.08, "{n:?}");
}

#[test]
fn ring_hash_is_consistent() {
    consistent_hash_checks(|c| Box::new(RingHash::new(c)));
}

#[test]
fn maglev_is_consistent() {
    consistent_hash_checks(|c| Box::new(Maglev::new(c)));
}

#[test]
fn empty_sets_pick_nothing() {
    for kind in [
        Balance::RoundRobin,
        Balance::Random,
        Balance::LeastRequest,
        Balance::PeakEwma,
        Balance::RingHash,
        Balance::Maglev,
    ] {
        let b = for_cluster(kind, Vec::new(), Tuning::default());
        assert_eq!(b.pick(&PickContext::default()), None, "{kind:?}");
        assert_eq!(
            b.pick(&PickContext {
                hash_key: Some(b"k")
            }),
            None,
            "{kind:?}"
        );
        let one = for_cluster(kind, cands(&[1]), Tuning::default());
        assert_eq!(one.pick(&PickContext::default()), Some(0), "{kind:?}");
    }
}
