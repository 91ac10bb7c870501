//! The load `bench --paths blk-host` puts on a backend through `frontend`: QD requests in
//! flight for a time (each completion refilled at once, the call eventfd waited on when none
//! is ready), per-request latencies, and the data pattern the image is filled with so that
//! reads can be checked (`--verify`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

use super::frontend::{BlkFrontend, FrontendError};

/// Bytes of a sector, the unit of virtio-blk offsets.
pub const SECTOR: u64 = 512;
/// The pattern the image is filled with; writes use another, so that written data shows.
pub const FILL_TAG: u64 = 0x5eed_f111;
pub const WRITE_TAG: u64 = 0x5eed_3717;
/// How long the requests still in flight at the end may take to complete.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a wait for the call eventfd looks at the clock and at Ctrl-C.
const WAIT_SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error("interrupted")]
    Interrupted,
    #[error("{inflight} requests did not complete within {}s of the end of the run (the backend stalled)", DRAIN_TIMEOUT.as_secs())]
    Stalled { inflight: u32 },
    #[error("no completion for {}s with {inflight} requests in flight (the backend stalled)", DRAIN_TIMEOUT.as_secs())]
    NoProgress { inflight: u32 },
}

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub write: bool,
    pub random: bool,
    pub bs: u64,
    pub qd: u32,
    /// Bytes at the start of the image the requests fall in.
    pub region: u64,
    pub seconds: u32,
    pub verify: bool,
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    pub verify_errors: u64,
    pub elapsed: Duration,
    /// Nanoseconds per request, sorted.
    pub latencies: Vec<u64>,
    pub kicks: u64,
    pub wakeups: u64,
}

impl Outcome {
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn mean_us(&self) -> Option<f64> {
        let n = self.latencies.len() as f64;
        (n > 0.0).then(|| self.latencies.iter().sum::<u64>() as f64 / n / 1000.0)
    }

    /// The `q` quantile (0..=1) of the latencies in microseconds.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let n = self.latencies.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1;
        self.latencies.get(rank).map(|&ns| ns as f64 / 1000.0)
    }
}

/// The eight bytes at word `word` of sector `sector` in the pattern `tag`.
pub fn pattern_word(tag: u64, sector: u64, word: u64) -> u64 {
    let x = sector.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tag.rotate_left(17) ^ word;
    x ^ (x >> 31)
}

/// Fills `buf` with the pattern `tag` as it lies from `sector` on.
pub fn fill_pattern(buf: &mut [u8], tag: u64, sector: u64) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let i = i as u64;
        let word = pattern_word(tag, sector + i * 8 / SECTOR, i % (SECTOR / 8));
        chunk.copy_from_slice(&word.to_le_bytes());
    }
}

/// Offsets of the requests: uniformly random blocks (xorshift64) or one block after another,
/// both within the region and wrapping.
struct Offsets {
    state: u64,
    next: u64,
    blocks: u64,
    random: bool,
}

impl Offsets {
    fn take(&mut self, bs: u64) -> u64 {
        let block = if self.random {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            self.state % self.blocks
        } else {
            let b = self.next;
            self.next = (self.next + 1) % self.blocks;
            b
        };
        block * bs / SECTOR
    }
}

/// Runs `w` on `front` until its time is up (or `stop` is set) and the last requests are in.
pub fn run(front: &mut BlkFrontend, w: &Workload, stop: &AtomicBool) -> Result<Outcome, LoadError> {
    let kind = if w.write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    front.prepare(kind, w.bs as u32, !w.write)?;
    if w.write {
        let mut buf = vec![0u8; w.bs as usize];
        for slot in 0..w.qd {
            fill_pattern(&mut buf, WRITE_TAG, u64::from(slot));
            write_buffer(front, slot, &buf)?;
        }
    }
    let mut offsets = Offsets {
        state: 0x2545_f491_4f6c_dd1d,
        next: 0,
        blocks: (w.region / w.bs).max(1),
        random: w.random,
    };
    let mut sectors = vec![0u64; w.qd as usize];
    let mut started = vec![Instant::now(); w.qd as usize];
    let mut out = Outcome::default();
    let mut done = Vec::with_capacity(w.qd as usize);
    let mut check = vec![0u8; if w.verify { w.bs as usize } else { 0 }];
    let mut expected = check.clone();
    let start = Instant::now();
    let end = start + Duration::from_secs(u64::from(w.seconds));
    for slot in 0..w.qd {
        sectors[slot as usize] = offsets.take(w.bs);
        started[slot as usize] = Instant::now();
        front.submit(slot, sectors[slot as usize])?;
    }
    front.publish()?;
    let mut inflight = w.qd;
    let mut last_progress = Instant::now();
    while inflight > 0 {
        done.clear();
        front.completions(&mut done)?;
        let now = Instant::now();
        for &(slot, status) in &done {
            let i = slot as usize;
            out.latencies.push((now - started[i]).as_nanos() as u64);
            out.requests += 1;
            if u32::from(status) != VIRTIO_BLK_S_OK {
                out.errors += 1;
            } else if w.verify && !w.write {
                read_buffer(front, slot, &mut check)?;
                fill_pattern(&mut expected, FILL_TAG, sectors[i]);
                out.verify_errors += u64::from(check != expected);
            }
            if now < end && !stop.load(Ordering::Relaxed) {
                sectors[i] = offsets.take(w.bs);
                started[i] = Instant::now();
                front.submit(slot, sectors[i])?;
            } else {
                inflight -= 1;
            }
        }
        if !done.is_empty() {
            front.publish()?;
            last_progress = now;
            out.elapsed = now - start;
            continue;
        }
        if now >= last_progress + DRAIN_TIMEOUT {
            return Err(if now >= end {
                LoadError::Stalled { inflight }
            } else {
                LoadError::NoProgress { inflight }
            });
        }
        // The used-event word was just written: a completion after the check above calls.
        if !front.pending()? {
            out.wakeups += u64::from(front.wait(WAIT_SLICE)?);
        }
    }
    if stop.load(Ordering::Relaxed) {
        return Err(LoadError::Interrupted);
    }
    out.kicks = front.kicks;
    out.latencies.sort_unstable();
    Ok(out)
}

/// One core's memcpy rate in MB/s over `duration`: `chunk`-sized copies out of a 64 MiB source
/// (larger than the caches, like an image) - what a copying backend cannot beat.
pub fn memcpy_mb_per_s(chunk: usize, duration: Duration) -> f64 {
    let src = vec![0x5au8; 64 << 20];
    let mut dst = vec![0u8; chunk];
    let chunks = src.len() / chunk;
    let (mut copied, mut i) = (0u64, 0);
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..16 {
            let at = (i % chunks) * chunk;
            dst.copy_from_slice(std::hint::black_box(&src[at..at + chunk]));
            std::hint::black_box(&mut dst);
            i += 1;
            copied += chunk as u64;
        }
    }
    copied as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn write_buffer(front: &BlkFrontend, slot: u32, buf: &[u8]) -> Result<(), FrontendError> {
    let at = front.layout().buffer(slot);
    front
        .memory()
        .write_slice(buf, GuestAddress(at))
        .map_err(|e| FrontendError::Access(at, e))
}

fn read_buffer(front: &BlkFrontend, slot: u32, buf: &mut [u8]) -> Result<(), FrontendError> {
    let at = front.layout().buffer(slot);
    front
        .memory()
        .read_slice(buf, GuestAddress(at))
        .map_err(|e| FrontendError::Access(at, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_depends_on_sector_and_tag() {
        let mut a = vec![0u8; 1024];
        fill_pattern(&mut a, FILL_TAG, 10);
        let mut b = vec![0u8; 512];
        fill_pattern(&mut b, FILL_TAG, 11);
        assert_eq!(&a[512..], &b[..], "the second sector of 10.. is sector 11");
        fill_pattern(&mut b, WRITE_TAG, 11);
        assert_ne!(&a[512..], &b[..]);
        assert_ne!(&a[..512], &a[512..]);
    }

    #[test]
    fn offsets_stay_in_the_region_and_on_block_boundaries() {
        for random in [false, true] {
            let mut o = Offsets {
                state: 1,
                next: 0,
                blocks: 4,
                random,
            };
            let seen: Vec<u64> = (0..64).map(|_| o.take(4096)).collect();
            assert!(seen.iter().all(|&s| s % 8 == 0 && s < 32), "{seen:?}");
            assert!((0..32).step_by(8).all(|s| seen.contains(&s)), "{seen:?}");
        }
    }

    #[test]
    fn memcpy_rate_is_measured() {
        assert!(memcpy_mb_per_s(1 << 20, Duration::from_millis(20)) > 0.0);
    }

    #[test]
    fn quantiles_pick_ranks() {
        let o = Outcome {
            latencies: (1..=1000).map(|us| us * 1000).collect(),
            ..Default::default()
        };
        assert_eq!(o.quantile_us(0.5), Some(500.0));
        assert_eq!(o.quantile_us(0.99), Some(990.0));
        assert_eq!(o.quantile_us(0.999), Some(999.0));
        assert_eq!(o.mean_us(), Some(500.5));
        assert_eq!(Outcome::default().quantile_us(0.5), None);
    }
}
