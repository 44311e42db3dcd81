//! The EBS direct APIs (snapshot blocks without an instance), through aws-sdk-ebs with the
//! standard configuration (`AWS_ENDPOINT_URL_EBS` or `AWS_ENDPOINT_URL` honoured).
//!
//! The SDK's own retries are off: every call is retried here, in [`with_retries`], the one
//! place that knows which answers are worth another try (throttling, server errors, lost
//! answers, and a snapshot the block API does not know yet right after StartSnapshot), with
//! capped, jittered exponential backoff, a per-request timeout and a count of the retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_ebs::config::http::HttpResponse;
use aws_sdk_ebs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use base64::Engine;
use thiserror::Error;

use super::Tags;

/// The size of a snapshot block.
pub const BLOCK: usize = 512 * 1024;

/// A failed EBS direct call: EBS's code, the HTTP status, and whether another try may help.
#[derive(Debug, Clone, Error)]
#[error("{action} failed: {message}")]
pub struct EbsError {
    pub action: &'static str,
    pub code: Option<String>,
    pub status: Option<u16>,
    pub message: String,
    /// Throttling, a server error, a timeout or a lost answer.
    pub transient: bool,
}

impl EbsError {
    fn not_found(&self) -> bool {
        self.code.as_deref() == Some("ResourceNotFoundException") || self.status == Some(404)
    }
}

fn fail<E>(action: &'static str, err: SdkError<E, HttpResponse>) -> EbsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_string);
    let (message, transient) = match &err {
        SdkError::ServiceError(s) => {
            let e = s.err();
            let text = e
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            let throttled = code.as_deref().is_some_and(|c| {
                c.contains("Throttl")
                    || c == "TooManyRequestsException"
                    || c == "RequestLimitExceeded"
            });
            let server = status.is_some_and(|s| s >= 500 || s == 429);
            (text, throttled || server)
        }
        SdkError::TimeoutError(_) => ("the request timed out".to_string(), true),
        SdkError::DispatchFailure(d) => (
            match d.as_connector_error() {
                Some(c) => format!("the EBS endpoint could not be reached ({c})"),
                None => "the EBS endpoint could not be reached".to_string(),
            },
            true,
        ),
        SdkError::ResponseError(_) => ("the answer was cut or garbled".to_string(), true),
        other => (other.to_string(), false),
    };
    let message = match &code {
        Some(c) if !message.contains(c.as_str()) => format!("{message} ({c})"),
        _ => message,
    };
    EbsError {
        action,
        code,
        status,
        message,
        transient,
    }
}

/// How calls are retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub first: Duration,
    pub cap: Duration,
    /// How long after StartSnapshot a "not found" is taken for the block API not knowing the
    /// snapshot yet (coldsnap#43) rather than for a snapshot that is gone.
    pub settle: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 10,
            first: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            settle: Duration::from_secs(60),
        }
    }
}

/// Calls `op` until it succeeds, fails for good, or runs out of attempts. `since`: when the
/// snapshot was started (for the not-yet-known window). Each retry is counted in `retries`.
pub async fn with_retries<T, F, Fut>(
    policy: Retry,
    since: Instant,
    retries: &AtomicU64,
    mut op: F,
) -> Result<T, EbsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EbsError>>,
{
    let mut pause = policy.first;
    let mut attempt = 1;
    loop {
        let err = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let young = since.elapsed() < policy.settle;
        if attempt >= policy.attempts || !(err.transient || (err.not_found() && young)) {
            return Err(err);
        }
        retries.fetch_add(1, Ordering::Relaxed);
        // Full jitter: concurrent uploads that were throttled together do not come back
        // together.
        let wait = pause.mul_f64(rand::random::<f64>().max(0.05));
        tokio::time::sleep(wait).await;
        pause = (pause * 2).min(policy.cap);
        attempt += 1;
    }
}

/// A started snapshot's block API.
#[derive(Clone)]
pub struct Ebs {
    client: aws_sdk_ebs::Client,
    pub retry: Retry,
    /// Retries made so far, by every call.
    pub retries: Arc<AtomicU64>,
}

/// One block read back.
pub struct Block {
    pub data: bytes::Bytes,
    /// Base64 SHA-256, as EBS gives it.
    pub checksum: String,
}

pub fn sha256_b64(data: &[u8]) -> String {
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data))
}

/// Loads the standard AWS configuration for the EBS direct APIs, with the SDK's retries off
/// (ours are in [`with_retries`]) and a timeout on every request.
pub async fn connect() -> Ebs {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .operation_attempt_timeout(Duration::from_secs(60))
        .operation_timeout(Duration::from_secs(60))
        .build();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts)
        .retry_config(RetryConfig::disabled())
        .load()
        .await;
    Ebs {
        client: aws_sdk_ebs::Client::new(&config),
        retry: Retry::default(),
        retries: Arc::default(),
    }
}

impl Ebs {
    /// StartSnapshot, encrypted, idempotent on `token`; cancelled by EBS after `timeout`
    /// minutes without a block or a completion.
    pub async fn start(
        &self,
        size_gib: i64,
        tags: &Tags,
        description: &str,
        token: &str,
        kms_key_arn: Option<&str>,
        timeout_minutes: i32,
    ) -> Result<String, EbsError> {
        let tags: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let out = with_retries(self.retry, Instant::now(), &self.retries, || async {
            self.client
                .start_snapshot()
                .volume_size(size_gib)
                .set_tags(Some(tags.clone()))
                .description(description)
                .client_token(token)
                .encrypted(true)
                .set_kms_key_arn(kms_key_arn.map(str::to_string))
                .timeout(timeout_minutes)
                .send()
                .await
                .map_err(|e| fail("Starting the snapshot (StartSnapshot)", e))
        })
        .await?;
        out.snapshot_id().map(str::to_string).ok_or(EbsError {
            action: "Starting the snapshot (StartSnapshot)",
            code: None,
            status: None,
            message: "EBS returned no snapshot ID".into(),
            transient: false,
        })
    }

    /// PutSnapshotBlock of one whole block, with its SHA-256 (`digest`, computed once by
    /// the caller, who needs it for the LINEAR checksum too).
    pub async fn put(
        &self,
        snapshot: &str,
        index: i32,
        data: bytes::Bytes,
        digest: &[u8; 32],
        since: Instant,
    ) -> Result<(), EbsError> {
        let checksum = base64::engine::general_purpose::STANDARD.encode(digest);
        with_retries(self.retry, since, &self.retries, || async {
            self.client
                .put_snapshot_block()
                .snapshot_id(snapshot)
                .block_index(index)
                .block_data(ByteStream::from(data.clone()))
                .data_length(BLOCK as i32)
                .checksum(&checksum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| fail("Writing a snapshot block (PutSnapshotBlock)", e))
        })
        .await
    }

    /// CompleteSnapshot with the block count and the LINEAR aggregate checksum.
    pub async fn complete(
        &self,
        snapshot: &str,
        blocks: i32,
        linear: &str,
        since: Instant,
    ) -> Result<(), EbsError> {
        with_retries(self.retry, since, &self.retries, || async {
            self.client
                .complete_snapshot()
                .snapshot_id(snapshot)
                .changed_blocks_count(blocks)
                .checksum(linear)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| fail("Completing the snapshot (CompleteSnapshot)", e))
        })
        .await
    }

    /// Every written block's index and token (ListSnapshotBlocks, all pages).
    pub async fn list(&self, snapshot: &str) -> Result<Vec<(i32, String)>, EbsError> {
        let mut blocks = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = with_retries(self.retry, Instant::now(), &self.retries, || async {
                self.client
                    .list_snapshot_blocks()
                    .snapshot_id(snapshot)
                    .set_next_token(next.clone())
                    .max_results(10_000)
                    .send()
                    .await
                    .map_err(|e| fail("Listing the snapshot's blocks (ListSnapshotBlocks)", e))
            })
            .await?;
            for b in page.blocks() {
                if let (Some(i), Some(t)) = (b.block_index(), b.block_token()) {
                    blocks.push((i, t.to_string()));
                }
            }
            next = page.next_token().map(str::to_string);
            if next.is_none() {
                break;
            }
        }
        Ok(blocks)
    }

    /// GetSnapshotBlock; the block's checksum is checked against its data here.
    pub async fn get(&self, snapshot: &str, index: i32, token: &str) -> Result<Block, EbsError> {
        const ACTION: &str = "Reading a snapshot block (GetSnapshotBlock)";
        with_retries(self.retry, Instant::now(), &self.retries, || async {
            let out = self
                .client
                .get_snapshot_block()
                .snapshot_id(snapshot)
                .block_index(index)
                .block_token(token)
                .send()
                .await
                .map_err(|e| fail(ACTION, e))?;
            let checksum = out.checksum().unwrap_or_default().to_string();
            let data = out.block_data.collect().await.map_err(|e| EbsError {
                action: ACTION,
                code: None,
                status: None,
                message: format!("the block's data was cut ({e})"),
                transient: true,
            })?;
            let data = data.into_bytes();
            if sha256_b64(&data) != checksum {
                return Err(EbsError {
                    action: ACTION,
                    code: None,
                    status: None,
                    message: format!("block {index} does not match its checksum"),
                    transient: true,
                });
            }
            Ok(Block { data, checksum })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &str, status: u16, transient: bool) -> EbsError {
        EbsError {
            action: "x",
            code: Some(code.into()),
            status: Some(status),
            message: code.into(),
            transient,
        }
    }

    fn quick() -> Retry {
        Retry {
            attempts: 5,
            first: Duration::from_millis(1),
            cap: Duration::from_millis(2),
            settle: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn throttling_is_retried_and_counted_then_succeeds() {
        let calls = AtomicU64::new(0);
        let retries = AtomicU64::new(0);
        let out = with_retries(quick(), Instant::now(), &retries, || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0..=2 => Err(err("ThrottlingException", 429, true)),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(retries.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_client_error_is_not_retried() {
        let retries = AtomicU64::new(0);
        let out: Result<(), _> = with_retries(quick(), Instant::now(), &retries, || async {
            Err(err("ValidationException", 400, false))
        })
        .await;
        assert!(out.is_err());
        assert_eq!(retries.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn not_found_is_retried_only_right_after_the_start() {
        let retries = AtomicU64::new(0);
        let calls = AtomicU64::new(0);
        let young = with_retries(quick(), Instant::now(), &retries, || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0 => Err(err("ResourceNotFoundException", 404, false)),
                _ => Ok(()),
            }
        })
        .await;
        assert!(young.is_ok());
        let long_ago = Instant::now() - Duration::from_secs(120);
        let old: Result<(), _> = with_retries(quick(), long_ago, &retries, || async {
            Err(err("ResourceNotFoundException", 404, false))
        })
        .await;
        assert!(old.is_err());
        assert_eq!(retries.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn attempts_run_out() {
        let retries = AtomicU64::new(0);
        let out: Result<(), _> = with_retries(quick(), Instant::now(), &retries, || async {
            Err(err("InternalServerException", 500, true))
        })
        .await;
        assert!(out.is_err());
        assert_eq!(retries.load(Ordering::Relaxed), 4);
    }
}
