//! Rate limits of the accept path and of each connection, on tokio's clock (so paused-time
//! tests drive them): [`FrameRate`], a token bucket of one connection's client frames, and
//! [`ConnectRate`], fixed one-second windows of new connections per IP.

use std::net::IpAddr;
use std::num::NonZeroU32;

use dashmap::DashMap;
use tokio::time::Instant;

/// What the frame bucket says about one more frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RateCheck {
    /// Within the rate.
    Allowed,
    /// Over the rate: refuse this frame with an `error` (`rate_limited`), keep the connection.
    Refused,
    /// Over the rate for a second's worth of frames in a row: close with 4029.
    Exceeded,
}

/// A token bucket of client frames: `per_second` tokens, refilled continuously.
#[derive(Debug)]
pub(super) struct FrameRate {
    per_second: f64,
    tokens: f64,
    last: Instant,
    /// Frames refused in a row; another second's worth closes the connection.
    strikes: u32,
}

impl FrameRate {
    pub(super) fn new(per_second: NonZeroU32) -> Self {
        let per_second = f64::from(per_second.get());
        Self {
            per_second,
            tokens: per_second,
            last: Instant::now(),
            strikes: 0,
        }
    }

    /// Take a token for one frame.
    pub(super) fn check(&mut self) -> RateCheck {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            RateCheck::Allowed
        } else {
            self.strikes += 1;
            if f64::from(self.strikes) > self.per_second {
                RateCheck::Exceeded
            } else {
                RateCheck::Refused
            }
        }
    }
}

/// New connections per IP, in fixed one-second windows counted from the node's start.
#[derive(Debug)]
pub(crate) struct ConnectRate {
    /// Most new connections per IP and second; 0: no limit.
    limit: u32,
    epoch: Instant,
    /// Per IP: the window (seconds since `epoch`) and the connections seen in it.
    windows: DashMap<IpAddr, (u64, u32)>,
}

impl ConnectRate {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit,
            epoch: Instant::now(),
            windows: DashMap::new(),
        }
    }

    fn window(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Count a new connection from `ip`; `true` if it is within the limit.
    pub(crate) fn allow(&self, ip: IpAddr) -> bool {
        if self.limit == 0 {
            return true;
        }
        let now = self.window();
        let mut e = self.windows.entry(ip).or_insert((now, 0));
        if e.0 != now {
            *e = (now, 0);
        }
        e.1 += 1;
        e.1 <= self.limit
    }

    /// Forget windows that are over (housekeeping).
    pub(crate) fn prune(&self) {
        let now = self.window();
        self.windows.retain(|_, (w, _)| *w + 2 >= now);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_over_the_rate_is_refused_then_closed_and_the_bucket_refills() {
        let mut rate = FrameRate::new(NonZeroU32::new(2).unwrap());
        assert_eq!(rate.check(), RateCheck::Allowed);
        assert_eq!(rate.check(), RateCheck::Allowed);
        // Two refusals in a row are tolerated (one second's worth), the third closes.
        assert_eq!(rate.check(), RateCheck::Refused);
        assert_eq!(rate.check(), RateCheck::Refused);
        assert_eq!(rate.check(), RateCheck::Exceeded);
        let mut rate = FrameRate::new(NonZeroU32::new(2).unwrap());
        rate.check();
        rate.check();
        assert_eq!(rate.check(), RateCheck::Refused);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            rate.check(),
            RateCheck::Allowed,
            "half a second refills one"
        );
        assert_eq!(rate.check(), RateCheck::Refused);
    }

    #[tokio::test(start_paused = true)]
    async fn connects_per_ip_are_counted_per_second_and_forgotten() {
        let rate = ConnectRate::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(rate.allow(a));
        assert!(rate.allow(a));
        assert!(!rate.allow(a), "the third in one second is refused");
        assert!(rate.allow(b), "another address has its own window");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(rate.allow(a), "a new second is a new window");
        tokio::time::advance(Duration::from_secs(5)).await;
        rate.prune();
        assert!(rate.windows.is_empty());
        assert!(ConnectRate::new(0).allow(a), "0 means no limit");
    }
}
