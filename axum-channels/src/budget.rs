//! The inbound budget of one connection: token buckets on the frames and
//! the bytes a client sends.
//!
//! A bucket holds up to two seconds' worth of tokens and refills at the
//! configured rate; each frame takes one frame token and one byte token per
//! byte. A client that sends steadily below the rate never notices; one that
//! floods runs the bucket dry within two seconds and is then told (see
//! [`Consumer::too_fast`](crate::Consumer::too_fast)). Time comes from
//! tokio's clock, so tests can run it paused.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

use crate::settings::InboundBudget;

/// How many seconds' worth of tokens a bucket holds.
const BURST_SECONDS: f64 = 2.0;

/// What a client went over, and how long until its budget allows the frame
/// it sent. Made by the runner; `#[non_exhaustive]`, so it may say more
/// one day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TooFast {
    /// `"frames"` or `"bytes"`.
    pub what: &'static str,
    /// The limit, per second.
    pub per_second: u32,
    /// How long until the budget has refilled enough.
    pub wait: Duration,
}

impl fmt::Display for TooFast {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sending too fast: the limit is {} {} per second",
            self.per_second, self.what
        )
    }
}

/// A connection's buckets.
#[derive(Debug)]
pub(crate) struct Budget {
    frames: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl Budget {
    /// Buckets for `budget`; the byte bucket holds at least one message of
    /// `max_message_size`, so that one allowed message always fits.
    pub(crate) fn new(budget: InboundBudget, max_message_size: usize) -> Budget {
        Budget {
            frames: budget
                .frames_per_second
                .map(|rate| Bucket::new("frames", rate, 1.0)),
            bytes: budget
                .bytes_per_second
                .map(|rate| Bucket::new("bytes", rate, max_message_size as f64)),
        }
    }

    /// Takes a frame of `size` bytes from the budget, or says why not.
    pub(crate) fn spend(&mut self, size: usize) -> Result<(), TooFast> {
        let now = Instant::now();
        if let Some(frames) = &mut self.frames {
            frames.take(1.0, now)?;
        }
        if let Some(bytes) = &mut self.bytes {
            bytes.take(size as f64, now)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Bucket {
    what: &'static str,
    per_second: u32,
    capacity: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(what: &'static str, per_second: NonZeroU32, at_least: f64) -> Bucket {
        let capacity = (f64::from(per_second.get()) * BURST_SECONDS).max(at_least);
        Bucket {
            what,
            per_second: per_second.get(),
            capacity,
            tokens: capacity,
            refilled: Instant::now(),
        }
    }

    fn take(&mut self, amount: f64, now: Instant) -> Result<(), TooFast> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        let rate = f64::from(self.per_second);
        self.tokens = (self.tokens + elapsed * rate).min(self.capacity);
        self.refilled = now;
        if self.tokens >= amount {
            self.tokens -= amount;
            return Ok(());
        }
        let missing = amount.min(self.capacity) - self.tokens;
        Err(TooFast {
            what: self.what,
            per_second: self.per_second,
            wait: Duration::from_secs_f64((missing / rate).min(BURST_SECONDS)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(frames: u32, bytes: u32) -> Budget {
        Budget::new(
            InboundBudget {
                frames_per_second: NonZeroU32::new(frames),
                bytes_per_second: NonZeroU32::new(bytes),
            },
            1000,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_client_below_the_rate_is_never_stopped() {
        let mut budget = budget(10, 0);
        for _ in 0..100 {
            budget.spend(10).unwrap();
            tokio::time::advance(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_gets_a_burst_then_is_stopped() {
        let mut budget = budget(10, 0);
        let allowed = (0..100).take_while(|_| budget.spend(1).is_ok()).count();
        assert_eq!(allowed, 20, "two seconds' worth at once");
        let err = budget.spend(1).unwrap_err();
        assert_eq!(err.what, "frames");
        assert_eq!(err.wait, Duration::from_millis(100));
        assert_eq!(
            err.to_string(),
            "sending too fast: the limit is 10 frames per second"
        );
        tokio::time::advance(err.wait).await;
        budget.spend(1).expect("refilled");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_counted_and_one_large_message_always_fits() {
        let mut budget = budget(0, 100);
        budget
            .spend(1000)
            .expect("the bucket holds one largest message");
        let err = budget.spend(100).unwrap_err();
        assert_eq!(err.what, "bytes");
        assert_eq!(err.wait, Duration::from_secs(1));
    }

    #[test]
    fn an_unlimited_budget_never_says_no() {
        let mut budget = Budget::new(InboundBudget::UNLIMITED, 10);
        for _ in 0..10_000 {
            budget.spend(usize::MAX).unwrap();
        }
    }
}
