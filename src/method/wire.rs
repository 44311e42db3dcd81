//! What goes over the wire for `dd`: the plain tar stream, or zstd frames that the helper
//! decompresses before writing (the volume always holds a plain tar). Chosen per run from
//! measurements, not a user's guess: the first megabytes of the archive say how compressible
//! the data is and how fast this machine compresses it; a short upload says how fast the link
//! is. Incompressible data is never compressed and pays no probe.

use std::process::Stdio;
use std::time::Instant;

use tokio::io::AsyncWriteExt;

use crate::helper::ssh::Session;

/// How much of the archive is looked at before deciding.
pub const SAMPLE: usize = 8 << 20;
/// The upload that measures the link.
const PROBE: usize = 4 << 20;
/// Data that shrinks less than this is sent as it is.
const WORTH_IT: f64 = 0.8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Plain,
    Zstd,
}

impl Wire {
    pub fn as_str(self) -> &'static str {
        match self {
            Wire::Plain => "plain",
            Wire::Zstd => "zstd",
        }
    }
}

/// Compressibility and compression speed of a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Compressed size over original size.
    pub ratio: f64,
    /// Bytes of input compressed per second, on one core.
    pub speed: f64,
}

pub fn measure(sample: &[u8]) -> Sample {
    let start = Instant::now();
    let compressed = compress(sample).map(|c| c.len()).unwrap_or(sample.len());
    let secs = start.elapsed().as_secs_f64().max(1e-6);
    Sample {
        ratio: compressed as f64 / sample.len().max(1) as f64,
        speed: sample.len() as f64 / secs,
    }
}

/// One zstd frame (level 1: fast, and most of the gain on text and code).
pub fn compress(chunk: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(chunk, 1)
}

/// Whether compressing beats sending as is: the time to push the data through the link
/// plainly, against the slower of compressing it and pushing the smaller stream.
pub fn choose(sample: Sample, link: f64) -> Wire {
    if sample.ratio > WORTH_IT || link <= 0.0 {
        return Wire::Plain;
    }
    let plain = 1.0 / link;
    let zstd = (1.0 / sample.speed).max(sample.ratio / link);
    if zstd < 0.8 * plain {
        Wire::Zstd
    } else {
        Wire::Plain
    }
}

/// Uploads part of the sample to the helper and returns the link's rate in bytes per second,
/// or None when the helper has no zstd (so compression is not an option).
pub async fn probe(ssh: &Session, sample: &[u8]) -> Option<f64> {
    let payload = &sample[..sample.len().min(PROBE)];
    // A command's own cost (one round trip over the master connection) is taken out.
    let start = Instant::now();
    ssh.run("Probing the helper", &["true"]).await.ok()?;
    let round_trip = start.elapsed().as_secs_f64();
    let mut child = ssh
        .command(&[
            "sh",
            "-c",
            "command -v zstd >/dev/null || exit 3; cat >/dev/null",
        ])
        .ok()?
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let start = Instant::now();
    let mut stdin = child.stdin.take()?;
    stdin.write_all(payload).await.ok()?;
    drop(stdin);
    let status = child.wait().await.ok()?;
    let secs = (start.elapsed().as_secs_f64() - round_trip).max(1e-3);
    status.success().then(|| payload.len() as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1024.0 * 1024.0;

    #[test]
    fn text_on_a_slow_link_is_compressed() {
        let s = Sample {
            ratio: 0.3,
            speed: 300.0 * MB,
        };
        assert_eq!(choose(s, 6.0 * MB), Wire::Zstd);
    }

    #[test]
    fn text_on_a_fast_link_is_not_when_compression_is_the_bottleneck() {
        let s = Sample {
            ratio: 0.3,
            speed: 150.0 * MB,
        };
        assert_eq!(choose(s, 200.0 * MB), Wire::Plain);
    }

    #[test]
    fn incompressible_data_is_never_compressed() {
        let s = Sample {
            ratio: 0.99,
            speed: 900.0 * MB,
        };
        assert_eq!(choose(s, 1.0 * MB), Wire::Plain);
    }

    #[test]
    fn measured_samples() {
        let text: Vec<u8> = b"fn main() { println!(\"hello\"); }\n".repeat(20_000);
        let t = measure(&text);
        assert!(t.ratio < 0.1, "{t:?}");
        let noise: Vec<u8> = (0..1_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let n = measure(&noise);
        assert!(n.ratio > t.ratio, "{n:?}");
        let back = zstd::bulk::decompress(&compress(&text).unwrap(), text.len()).unwrap();
        assert_eq!(back, text);
    }
}
