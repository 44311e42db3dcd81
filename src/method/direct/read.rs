//! Reading a `--direct` snapshot back without an instance: its blocks in order from
//! GetSnapshotBlock (each checked against its SHA-256), [`super::IN_FLIGHT`] at a time, cut at
//! the archive's recorded length and fed to the same consumers a helper's read feeds.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;

use crate::cloud::ebs::{Ebs, BLOCK};
use crate::method::dd::read::{deliver, ReadBack, Sink};
use crate::method::MethodError;

use super::IN_FLIGHT;

/// Streams the first `bytes` bytes of the snapshot into `sink`.
pub async fn read(
    ebs: &Ebs,
    snapshot: &str,
    bytes: u64,
    sink: Sink,
    progress: &indicatif::ProgressBar,
) -> Result<ReadBack, MethodError> {
    let failed = |e: crate::cloud::ebs::EbsError| MethodError::Failed(e.to_string());
    let tokens: BTreeMap<i32, String> = ebs
        .list(snapshot)
        .await
        .map_err(failed)?
        .into_iter()
        .collect();
    let count = bytes.div_ceil(BLOCK as u64);
    if let Some(missing) = (0..count as i32).find(|i| !tokens.contains_key(i)) {
        return Err(MethodError::Failed(format!(
            "the snapshot {snapshot} has no block {missing}: it does not hold the whole archive"
        )));
    }
    let (from, mut to) =
        std::io::pipe().map_err(|e| MethodError::Failed(format!("cannot make a pipe: {e}")))?;
    crate::method::widen_pipe(&to);
    // Blocks go to the pipe from a thread of their own (a blocking write), in order.
    let (send, mut blocks) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let writer = std::thread::Builder::new()
        .name("ec2-backup-blocks".into())
        .spawn(move || {
            while let Some(b) = blocks.blocking_recv() {
                if to.write_all(&b).is_err() {
                    break; // the consumer is done (it has seen the archive's end)
                }
            }
        })
        .map_err(|e| MethodError::Failed(format!("cannot start the stream's thread: {e}")))?;
    let fetch = async {
        let mut ahead = VecDeque::new();
        let mut next = 0u64;
        let mut sent = 0u64;
        while sent < count {
            while next < count && ahead.len() < IN_FLIGHT {
                let (ebs, id) = (ebs.clone(), snapshot.to_string());
                let token = tokens[&(next as i32)].clone();
                let index = next as i32;
                ahead.push_back(tokio::spawn(
                    async move { ebs.get(&id, index, &token).await },
                ));
                next += 1;
            }
            let Some(front) = ahead.pop_front() else {
                break;
            };
            let block = front
                .await
                .map_err(|e| MethodError::Failed(format!("a read task failed: {e}")))?
                .map_err(failed)?;
            let keep = (bytes - sent * BLOCK as u64).min(BLOCK as u64) as usize;
            if send
                .send(block.data.slice(..keep.min(block.data.len())))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        for task in ahead {
            task.abort();
        }
        drop(send);
        Ok::<(), MethodError>(())
    };
    let (fetched, delivered) = tokio::join!(fetch, deliver(from, Some(bytes), sink, progress));
    let _ = writer.join();
    let (copied, outputs) = delivered?;
    fetched?;
    let copied = copied?;
    if copied.bytes != bytes && outputs.iter().all(|o| o.status.success()) {
        return Err(MethodError::Failed(format!(
            "the snapshot gave {} of the archive's {bytes} bytes",
            copied.bytes
        )));
    }
    Ok(ReadBack {
        bytes: copied.bytes,
        sha256: copied.sha256,
        outputs,
    })
}
