//! Rough costs, for `--dry-run` and `--json`. List prices of us-east-1 (on-demand Linux,
//! gp3); other regions differ by a few tens of percent. Estimates, not a bill.

/// gp3 storage, per GiB-month.
pub const GP3_USD_PER_GIB_MONTH: f64 = 0.08;

/// On-demand hourly price of the helper types people are likely to pick.
pub fn hourly_usd(instance_type: &str) -> Option<f64> {
    Some(match instance_type {
        "t3.nano" => 0.0052,
        "t3.micro" => 0.0104,
        "t3.small" => 0.0208,
        "t3.medium" => 0.0416,
        "t3.large" => 0.0832,
        "t3a.nano" => 0.0047,
        "t3a.micro" => 0.0094,
        "t3a.small" => 0.0188,
        "t4g.nano" => 0.0042,
        "t4g.micro" => 0.0084,
        "t4g.small" => 0.0168,
        "t4g.medium" => 0.0336,
        "t2.nano" => 0.0058,
        "t2.micro" => 0.0116,
        "t2.small" => 0.023,
        "m5.large" => 0.096,
        "m6i.large" => 0.096,
        "m7i.large" => 0.1008,
        "m6g.large" => 0.077,
        "m7g.large" => 0.0816,
        "c5.large" => 0.085,
        "c6i.large" => 0.085,
        "c7i.large" => 0.08925,
        "c6g.large" => 0.068,
        "c7g.large" => 0.0725,
        "c6in.large" => 0.1134,
        _ => return None,
    })
}

/// What the helper costs for `seconds` of running (billed per second, 60 s minimum).
pub fn instance_usd(instance_type: &str, seconds: f64) -> Option<f64> {
    hourly_usd(instance_type).map(|h| h * seconds.max(60.0) / 3600.0)
}

/// What a volume of `gib` costs per month while it is kept.
pub fn volume_usd_per_month(gib: i32) -> f64 {
    f64::from(gib) * GP3_USD_PER_GIB_MONTH
}

/// EBS snapshot storage, standard tier, per GB-month (us-east-1).
const SNAPSHOT_USD_PER_GIB_MONTH: f64 = 0.05;

/// What a volume's first snapshot holding `bytes` of written data costs per month (later
/// snapshots store only changed blocks: see docs/history.md).
pub fn snapshot_usd_per_month(bytes: u64) -> f64 {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    (gib * SNAPSHOT_USD_PER_GIB_MONTH * 10_000.0).round() / 10_000.0
}

/// EBS direct APIs: PutSnapshotBlock per 1,000 blocks, GetSnapshotBlock per 1,000 blocks.
const PUT_BLOCK_USD_PER_1000: f64 = 0.006;
const GET_BLOCK_USD_PER_1000: f64 = 0.003;

/// What `blocks` PutSnapshotBlock calls cost (`--direct`: ~$0.012 per GiB).
pub fn put_blocks_usd(blocks: u64) -> f64 {
    blocks as f64 / 1000.0 * PUT_BLOCK_USD_PER_1000
}

/// What `blocks` GetSnapshotBlock calls cost (reading a `--direct` snapshot back).
pub fn get_blocks_usd(blocks: u64) -> f64 {
    blocks as f64 / 1000.0 * GET_BLOCK_USD_PER_1000
}

/// A guess at a run's length: boot and teardown, plus the data at a modest 50 MiB/s.
pub fn estimated_seconds(bytes: u64) -> f64 {
    120.0 + bytes as f64 / (50.0 * 1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_has_a_minute_minimum() {
        let minute = instance_usd("t3.micro", 1.0).unwrap();
        assert!((minute - 0.0104 / 60.0).abs() < 1e-9);
        let hour = instance_usd("t3.micro", 3600.0).unwrap();
        assert!((hour - 0.0104).abs() < 1e-9);
        assert_eq!(instance_usd("x9.huge", 10.0), None);
    }

    #[test]
    fn volumes_cost_per_gib_month() {
        assert!((volume_usd_per_month(20) - 1.6).abs() < 1e-9);
    }
}
