//! `--direct`: the dd archive (the same tar stream, from byte 0) written straight into
//! 512 KiB snapshot blocks through the EBS direct APIs, with no instance.
//!
//! tar runs here, from before the snapshot is started (see [`Aim`]); its stream is cut into
//! blocks as it comes, each block hashed and sent by
//! one of [`IN_FLIGHT`] to [`MAX_IN_FLIGHT`] concurrent PutSnapshotBlock calls. Memory stays
//! at that many blocks, plus [`HASH_QUEUE`] waiting for the archive's hash and two being
//! read or waiting for a slot (about 54 MiB at most); every block of the archive is written, zeros too (an unwritten block of an
//! encrypted snapshot reads back as garbage), and nothing past its end. The LINEAR checksum
//! for CompleteSnapshot is the SHA-256 of the blocks' SHA-256 digests in index order.

pub mod read;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use crate::cloud::ebs::{Ebs, BLOCK};
use crate::helper::ssh::detach_from_terminal_signals;
use crate::method::archive::{finish_tar, tar_command, watch_tar_messages, Archive};
use crate::method::{MethodError, Source, Transfer};

/// Blocks in flight at once to begin with: enough to keep AWS's 1,000 PutSnapshotBlock/s per
/// snapshot (~500 MiB/s) busy across ~60 ms of round trip, in 32 MiB of memory. Reads keep
/// this many.
pub const IN_FLIGHT: usize = 64;

/// The most blocks an upload has in flight (48 MiB) when the link's round trip is long: 960
/// puts/s across 100 ms, with the process's peak memory near 80 MiB (128 would near 100).
pub const MAX_IN_FLIGHT: usize = 96;

/// AWS's PutSnapshotBlock limit per snapshot, per second.
const PUTS_PER_SECOND: f64 = 1000.0;

/// Puts per look at the round trip.
const WINDOW: usize = 32;

/// How many blocks go at once: [`IN_FLIGHT`], raised (never lowered) up to [`MAX_IN_FLIGHT`]
/// when the link's round trip needs more to reach AWS's rate (Little's law: in flight = rate
/// x round trip). The round trip is the quickest put of the last [`WINDOW`]: a run that is
/// bound by this machine's CPU has its puts wait here, and more of them in flight would only
/// hold more memory; a throttled put's backoff is never the quickest. The first
/// [`IN_FLIGHT`] puts are not looked at: each opened its own connection (TCP and TLS
/// handshakes, slow start), which says nothing of the round trip after.
#[derive(Debug)]
struct Concurrency {
    now: usize,
    quickest: Duration,
    seen: usize,
    warming: usize,
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            now: IN_FLIGHT,
            quickest: Duration::MAX,
            seen: 0,
            warming: IN_FLIGHT,
        }
    }
}

impl Concurrency {
    /// Takes one put's time; returns how many more may go at once from now on.
    fn observe(&mut self, took: Duration) -> usize {
        if self.warming > 0 {
            self.warming -= 1;
            return 0;
        }
        self.quickest = self.quickest.min(took);
        self.seen += 1;
        if self.seen < WINDOW {
            return 0;
        }
        let want = (PUTS_PER_SECOND * self.quickest.as_secs_f64()).ceil() as usize;
        let want = want.clamp(IN_FLIGHT, MAX_IN_FLIGHT);
        (self.quickest, self.seen) = (Duration::MAX, 0);
        let more = want.saturating_sub(self.now);
        self.now += more;
        more
    }
}

/// Blocks queued for the archive's SHA-256 (a few MiB, on top of those in flight).
const HASH_QUEUE: usize = 8;

/// A block written: its index, its SHA-256, and how long its put took.
type Sent = (u64, [u8; 32], Duration);

/// What was uploaded.
#[derive(Debug)]
pub struct Uploaded {
    pub transfer: Transfer,
    pub blocks: u64,
    /// Base64 SHA-256 over the blocks' digests, for CompleteSnapshot.
    pub linear: String,
}

/// Where an upload's blocks go: a pending snapshot, as StartSnapshot answered.
#[derive(Debug, Clone)]
pub struct Target {
    pub snapshot: String,
    /// When StartSnapshot was called: for a while after it, PutSnapshotBlock may answer that
    /// the snapshot does not exist (retried, see [`Ebs::put`]).
    pub since: Instant,
    pub capacity_gib: i32,
}

impl Target {
    fn capacity_blocks(&self) -> u64 {
        u64::try_from(self.capacity_gib).unwrap_or(0) * BLOCKS_PER_GIB
    }

    /// An [`Aim`] that is already known.
    pub fn aim(self) -> Aim {
        tokio::sync::watch::channel(Some(self)).1
    }
}

/// The [`Target`] to come: `None` until the snapshot is started. An upload does not wait for
/// it to start tar: the first blocks are read, hashed and queued meanwhile (the reads stop at
/// the blocks in flight), and go once it is known. A sender dropped with `None` (the snapshot
/// could not be started) stops the upload.
pub type Aim = tokio::sync::watch::Receiver<Option<Target>>;

/// No snapshot is smaller than 1 GiB.
const BLOCKS_PER_GIB: u64 = (1 << 30) / BLOCK as u64;

async fn aimed(aim: &mut Aim) -> Result<Target, MethodError> {
    aim.wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|t| t.clone())
        .ok_or_else(|| MethodError::Failed("the upload's snapshot was not started".into()))
}

/// Streams the archive of `source` into the pending snapshot `aim` names (or will). An
/// archive that reaches the snapshot's end stops the upload with [`MethodError::Outgrown`]:
/// nothing is written past it, and the caller decides.
pub async fn upload(
    ebs: &Ebs,
    mut aim: Aim,
    source: &Source,
    progress: &indicatif::ProgressBar,
) -> Result<Uploaded, MethodError> {
    let mut capacity_blocks = None;
    let spawn = |e| MethodError::Spawn {
        program: "tar",
        source: e,
    };
    // The same archive as the dd method's: the same tar, fed the walk's names.
    let Archive { tar: mut cmd, feed } = tar_command(source)?;
    let mut tar = {
        detach_from_terminal_signals(&mut cmd);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn)?
    };
    drop(cmd);
    let listed = feed.start();
    let messages = tokio::spawn(watch_tar_messages(tar.stderr.take(), source.dir.clone()));
    let mut stdout = tar
        .stdout
        .take()
        .ok_or_else(|| MethodError::Failed("tar's output could not be read".into()))?;
    crate::method::widen_pipe(&stdout);
    // The archive's own SHA-256 (the `sha256` tag, as dd's) is one serial pass over the
    // stream: it runs on a thread of its own, beside the reads and the blocks' digests
    // (which the put tasks compute, in parallel), so no block is hashed twice in a row here.
    let (to_hasher, mut hasher_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(HASH_QUEUE);
    let hasher = std::thread::spawn(move || {
        let mut whole = Sha256::new();
        while let Some(b) = hasher_rx.blocking_recv() {
            whole.update(&b);
        }
        whole.finalize()
    });
    let pool = Pool::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut puts: JoinSet<Result<Sent, MethodError>> = JoinSet::new();
    let mut concurrency = Concurrency::default();
    let mut digests: Vec<Option<[u8; 32]>> = Vec::new();
    let mut bytes = 0u64;
    let failed = loop {
        let mut block = pool.take();
        // Each put is taken as it ends, also while tar is slow to write (or hung): a failed
        // one ends the upload at once.
        let mut n = 0;
        let read = loop {
            tokio::select! {
                biased;
                Some(done) = puts.join_next(), if !puts.is_empty() => match flatten(done) {
                    Ok(sent) => confirm(sent, &mut digests, &mut concurrency, &slots),
                    Err(e) => break Err(e),
                },
                r = stdout.read(&mut block[n..]) => match r {
                    Ok(0) => break Ok(n),
                    Ok(k) if n + k == block.len() => break Ok(n + k),
                    Ok(k) => n += k,
                    Err(e) => break Err(MethodError::Failed(format!("reading from tar failed: {e}"))),
                },
            }
        };
        let n = match read {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) => break Some(e),
        };
        bytes += n as u64;
        let index = digests.len() as u64;
        if capacity_blocks.is_none() {
            capacity_blocks = aim.borrow().as_ref().map(Target::capacity_blocks);
        }
        // Not known yet this far in only if the slots did not stop the reads (they do, at the
        // blocks in flight): wait for it rather than guess.
        if capacity_blocks.is_none() && index >= BLOCKS_PER_GIB {
            match aimed(&mut aim).await {
                Ok(t) => capacity_blocks = Some(t.capacity_blocks()),
                Err(e) => break Some(e),
            }
        }
        if capacity_blocks.is_some_and(|c| index >= c) {
            break Some(MethodError::Outgrown);
        }
        // tar pads its stream to whole 1 MiB records, so every block is whole; a short one
        // (never expected) is padded with zeros, as the volume would read past the end.
        block[n..].fill(0);
        let block = pool.share(block);
        if to_hasher.send(block.slice(..n)).await.is_err() {
            break Some(MethodError::Failed("hashing the archive stopped".into()));
        }
        digests.push(None);
        let permit = match Arc::clone(&slots).acquire_owned().await {
            Ok(p) => p,
            Err(_) => break Some(MethodError::Failed("the upload stopped".into())),
        };
        let (ebs, mut aim, bar) = (ebs.clone(), aim.clone(), progress.clone());
        puts.spawn(async move {
            let digest: [u8; 32] = Sha256::digest(&block).into();
            let to = aimed(&mut aim).await?;
            let put = Instant::now();
            let sent = ebs
                .put(&to.snapshot, index as i32, block, &digest, to.since)
                .await;
            let took = put.elapsed();
            drop(permit);
            bar.inc(n as u64);
            sent.map(|()| (index, digest, took))
                .map_err(|e| MethodError::Failed(e.to_string()))
        });
    };
    drop(to_hasher);
    let failed = match failed {
        Some(e) => Some(e),
        None => {
            let mut first = None;
            while let Some(done) = puts.join_next().await {
                match flatten(done) {
                    Ok((i, d, _)) => digests[i as usize] = Some(d),
                    Err(e) => {
                        first.get_or_insert(e);
                        puts.abort_all();
                    }
                }
            }
            first
        }
    };
    progress.finish_and_clear();
    let whole = tokio::task::spawn_blocking(move || hasher.join())
        .await
        .ok()
        .and_then(Result::ok);
    if let Some(e) = failed {
        puts.abort_all();
        let _ = tar.start_kill();
        return Err(e);
    }
    let (unreadable, torn) = finish_tar(&mut tar, messages, listed).await?;
    let whole = whole.ok_or_else(|| MethodError::Failed("hashing the archive failed".into()))?;
    let digests: Vec<[u8; 32]> = digests
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| MethodError::Failed("a block was not confirmed".into()))?;
    let linear = linear_checksum(&digests);
    Ok(Uploaded {
        blocks: digests.len() as u64,
        linear,
        transfer: Transfer {
            bytes,
            sha256: Some(hex::encode(whole)),
            incomplete: unreadable || !torn.is_empty(),
            changed: torn,
            wire: None,
            wire_bytes: bytes,
        },
    })
}

/// The LINEAR aggregate: SHA-256 over the blocks' digests in index order, base64.
pub fn linear_checksum(digests: &[[u8; 32]]) -> String {
    let mut h = Sha256::new();
    for d in digests {
        h.update(d);
    }
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

fn flatten<T>(
    done: Result<Result<T, MethodError>, tokio::task::JoinError>,
) -> Result<T, MethodError> {
    done.map_err(|e| MethodError::Failed(format!("an upload task failed: {e}")))?
}

/// A put that succeeded: its digest kept for LINEAR, its time for the blocks in flight.
fn confirm(
    (index, digest, took): Sent,
    digests: &mut [Option<[u8; 32]>],
    concurrency: &mut Concurrency,
    slots: &tokio::sync::Semaphore,
) {
    digests[index as usize] = Some(digest);
    let more = concurrency.observe(took);
    if more > 0 {
        tracing::debug!(in_flight = concurrency.now, "more blocks in flight");
        slots.add_permits(more);
    }
}

/// Block buffers, reused: a block's memory comes back once its last user (its put, the
/// archive's hasher) lets go of it. A run allocates (and the kernel faults in and zeroes)
/// as many buffers as are ever alive at once (see the module's head), instead of one per
/// block.
#[derive(Clone, Default)]
struct Pool(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Pool {
    /// A block-sized buffer; a reused one holds an earlier block's bytes.
    fn take(&self) -> Vec<u8> {
        let reused = self.0.lock().ok().and_then(|mut free| free.pop());
        reused.unwrap_or_else(|| vec![0u8; BLOCK])
    }

    /// The buffer as shareable bytes that return to the pool when the last copy goes.
    fn share(&self, buf: Vec<u8>) -> bytes::Bytes {
        bytes::Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Ok(mut free) = self.pool.0.lock() {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_blocks_go_at_once_only_when_the_round_trip_needs_them() {
        let ms = Duration::from_millis;
        let window = |c: &mut Concurrency, quickest: u64, typical: u64| -> usize {
            let mut more = c.observe(ms(quickest));
            for _ in 1..WINDOW {
                more += c.observe(ms(typical));
            }
            more
        };
        // The first puts (new connections) say nothing, however slow.
        let mut c = Concurrency::default();
        for _ in 0..IN_FLIGHT {
            assert_eq!(c.observe(ms(900)), 0);
        }
        // 50 ms: 64 keep 1,000/s busy, however long the queued puts take.
        assert_eq!(window(&mut c, 52, 140), 0);
        assert_eq!(c.now, IN_FLIGHT);
        // 80 ms: 80 needed; never past the cap, never lowered.
        assert_eq!(window(&mut c, 80, 160), 16);
        assert_eq!(c.now, 80);
        assert_eq!(window(&mut c, 300, 400), MAX_IN_FLIGHT - 80);
        assert_eq!(window(&mut c, 5, 5), 0);
        assert_eq!(c.now, MAX_IN_FLIGHT);
        // Nothing changes before a window is full.
        let mut d = Concurrency {
            warming: 0,
            ..Concurrency::default()
        };
        for _ in 1..WINDOW {
            assert_eq!(d.observe(ms(500)), 0);
        }
        assert_eq!(d.observe(ms(500)), MAX_IN_FLIGHT - IN_FLIGHT);
    }

    #[test]
    fn a_block_buffer_returns_to_the_pool_when_its_last_copy_goes() {
        let pool = Pool::default();
        let buf = pool.take();
        assert_eq!(buf.len(), BLOCK);
        let at = buf.as_ptr();
        let shared = pool.share(buf);
        let for_hasher = shared.slice(..10);
        drop(shared);
        // Still held by the hasher's copy: a new buffer.
        let other = pool.take();
        assert_ne!(other.as_ptr(), at);
        drop(for_hasher);
        let again = pool.take();
        assert_eq!((again.as_ptr(), again.len()), (at, BLOCK));
    }

    #[test]
    fn linear_is_the_hash_of_the_digests_in_order() {
        let a: [u8; 32] = Sha256::digest([1u8]).into();
        let b: [u8; 32] = Sha256::digest([2u8]).into();
        let mut h = Sha256::new();
        h.update(a);
        h.update(b);
        let expected = base64::engine::general_purpose::STANDARD.encode(h.finalize());
        assert_eq!(linear_checksum(&[a, b]), expected);
        assert_ne!(linear_checksum(&[b, a]), expected);
    }
}
