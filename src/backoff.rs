//! Exponential backoff with jitter, for loops that retry after an error.

use std::time::Duration;

use rand::Rng;

/// The wait before retry number `attempt` (1 for the first retry): `base · 2^(attempt-1)`,
/// capped at `cap`, of which a random half is taken off, so that replicas that failed
/// together do not retry together.
pub fn delay(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exponent).min(cap);
    let half = full / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_bounds() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(30);
        for (attempt, full_ms) in [(1, 100), (2, 200), (3, 400), (5, 1600)] {
            for _ in 0..50 {
                let wait = delay(attempt, base, cap);
                assert!(
                    wait >= Duration::from_millis(full_ms / 2),
                    "{attempt}: {wait:?}"
                );
                assert!(
                    wait <= Duration::from_millis(full_ms),
                    "{attempt}: {wait:?}"
                );
            }
        }
    }

    #[test]
    fn never_exceeds_the_cap() {
        let cap = Duration::from_secs(30);
        for attempt in [10, 31, 1000, u32::MAX] {
            let wait = delay(attempt, Duration::from_millis(100), cap);
            assert!(wait <= cap && wait >= cap / 2, "{attempt}: {wait:?}");
        }
    }
}
