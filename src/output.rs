//! What goes to stdout: the volume ID (or one JSON object with `--json`), or with
//! `--dry-run` the plan and its estimated cost.

use serde_json::json;

use crate::commands::backup::direct::DirectPlan;
use crate::commands::backup::{History, Outcome, Plan};
use crate::cost;
use crate::helper::keys::KeyPlan;
use crate::method::Method;

/// Dollars to a millionth, so that JSON shows 0.000348 rather than float noise.
fn micro(usd: f64) -> f64 {
    (usd * 1e6).round() / 1e6
}

pub fn backup(o: &Outcome, as_json: bool) -> String {
    if !as_json {
        return match (&o.snapshot_id, o.volume_deleted) {
            (Some(snapshot), true) => snapshot.clone(),
            _ => o.volume_id.clone(),
        };
    }
    json!({
        "volume_id": (!o.volume_deleted).then_some(&o.volume_id),
        "snapshot_id": o.snapshot_id,
        "volume_size_gib": o.size_gib,
        "method": o.method.as_str(),
        "bytes": o.transfer.bytes,
        "wire": o.transfer.wire,
        "wire_bytes": o.transfer.wire.map(|_| o.transfer.wire_bytes),
        "sha256": o.transfer.sha256,
        "complete": !o.transfer.incomplete,
        "duration_seconds": (o.seconds * 10.0).round() / 10.0,
        "region": o.region,
        "zone": o.zone,
        "instance_type": o.instance_type,
        "instance_cost_usd": cost::instance_usd(&o.instance_type, o.seconds).map(micro),
        "volume_cost_usd_per_month": (!o.volume_deleted).then(|| cost::volume_usd_per_month(o.size_gib)),
        "snapshot_cost_usd_per_month": o.snapshot_id.as_ref().map(|_| cost::snapshot_usd_per_month(o.transfer.bytes)),
        "direct": o.put_blocks.is_some(),
        "api_cost_usd": o.put_blocks.map(|b| micro(cost::put_blocks_usd(b))),
    })
    .to_string()
}

pub fn dry_run(plan: &Plan, method: Method, history: History, as_json: bool) -> String {
    let helper = &plan.helper;
    let size = plan
        .existing_volume
        .as_ref()
        .map(|v| v.size_gib)
        .unwrap_or(plan.new_volume_gib);
    let seconds = cost::estimated_seconds(plan.inventory.data_bytes);
    let instance_cost = cost::instance_usd(&helper.instance_type, seconds);
    let volume_cost = cost::volume_usd_per_month(size);
    let snapshot_cost = (history != History::Volume)
        .then(|| cost::snapshot_usd_per_month(plan.inventory.data_bytes));
    let volume_kept = history != History::SnapshotOnly;
    let key = match &helper.key {
        KeyPlan::Existing { .. } => None,
        KeyPlan::Create { path } => Some(format!(
            "create the key pair {} and save its private key to {}",
            helper.key_name,
            path.display()
        )),
        KeyPlan::Import { path, .. } => Some(format!(
            "import {} as the key pair {}",
            path.display(),
            helper.key_name
        )),
    };
    if as_json {
        return json!({
            "dry_run": true,
            "directory": plan.dir.to_string_lossy(),
            "entries": plan.inventory.entries,
            "data_bytes": plan.inventory.data_bytes,
            "method": method.as_str(),
            "region": helper.region,
            "zone": helper.zone,
            "instance_type": helper.instance_type,
            "architecture": helper.arch.as_str(),
            "image_id": helper.image_id,
            "existing_volume": plan.existing_volume.as_ref().map(|v| &v.id),
            "new_volume_gib": plan.existing_volume.is_none().then_some(plan.new_volume_gib),
            "key_pair": key,
            // null: the address the helper will see, found once it has one.
            "security_group_ingress": helper.ssh_group.as_ref().and_then(|g| g.cidr.as_ref()),
            "estimated_seconds": seconds.round(),
            "estimated_instance_cost_usd": instance_cost.map(micro),
            "volume_cost_usd_per_month": volume_kept.then_some(volume_cost),
            "snapshot_cost_usd_per_month": snapshot_cost,
        })
        .to_string();
    }
    let mut lines = vec![format!(
        "Back up {} ({} entries, {} MiB of data) with {}:",
        plan.dir.display(),
        plan.inventory.entries,
        plan.inventory.data_bytes.div_ceil(1 << 20),
        method.as_str()
    )];
    if let Some(k) = key {
        lines.push(format!("  {k}"));
    }
    if let Some(g) = &helper.ssh_group {
        let from = match &g.cidr {
            Some(cidr) => cidr.clone(),
            None => "this machine's address (as the helper will see it)".to_string(),
        };
        lines.push(format!(
            "  use the helpers' security group ec2-backup-ssh in {} (made if missing), admitting ssh only from {from}",
            g.vpc
        ));
    }
    lines.push(format!(
        "  launch a {} ({}) helper from {} in {}",
        helper.instance_type,
        helper.arch.as_str(),
        helper.image_id,
        helper.zone
    ));
    match &plan.existing_volume {
        Some(v) => lines.push(format!(
            "  write to the existing volume {} ({} GiB)",
            v.id, v.size_gib
        )),
        None => lines.push(format!(
            "  create an encrypted {} GiB gp3 volume in {}",
            plan.new_volume_gib, helper.zone
        )),
    }
    let instance = match instance_cost {
        Some(c) => format!("about ${c:.4} for the helper (~{:.0} min)", seconds / 60.0),
        None => format!(
            "the helper's price for {} is not known here",
            helper.instance_type
        ),
    };
    match history {
        History::Volume => {}
        History::Snapshot => lines.push("  then snapshot the volume and wait until the snapshot is completed".into()),
        History::SnapshotOnly => lines.push("  then snapshot the volume, wait until the snapshot is completed, and delete the volume".into()),
    }
    let mut kept = Vec::new();
    if volume_kept {
        kept.push(format!(
            "the volume about ${volume_cost:.2} per month while kept"
        ));
    }
    if let Some(c) = snapshot_cost {
        kept.push(format!(
            "the snapshot {} per month (a first snapshot of the data; later ones store changed blocks)",
            usd_small(c)
        ));
    }
    lines.push(format!(
        "Estimated cost (us-east-1 list prices): {instance}; {}.",
        kept.join("; ")
    ));
    lines.push("Nothing was created.".to_string());
    lines.join("\n")
}

/// `--direct --dry-run`: what would be uploaded and made, and what it costs.
pub fn direct_dry_run(plan: &DirectPlan, history: History, as_json: bool) -> String {
    let blocks = plan.blocks();
    let api = cost::put_blocks_usd(blocks);
    let snapshot = cost::snapshot_usd_per_month(plan.archive_bytes);
    let volume =
        (history != History::SnapshotOnly).then(|| cost::volume_usd_per_month(plan.snapshot_gib));
    let snapshot_kept = history != History::Volume;
    if as_json {
        return json!({
            "dry_run": true,
            "direct": true,
            "directory": plan.dir.to_string_lossy(),
            "entries": plan.inventory.entries,
            "data_bytes": plan.inventory.data_bytes,
            "archive_bytes": plan.archive_bytes,
            "blocks": blocks,
            "method": "dd",
            "region": plan.region,
            "zone": plan.zone,
            "snapshot_gib": plan.snapshot_gib,
            "api_cost_usd": micro(api),
            "snapshot_cost_usd_per_month": snapshot_kept.then_some(snapshot),
            "volume_cost_usd_per_month": volume,
        })
        .to_string();
    }
    let mut lines = vec![
        format!(
            "Back up {} ({} entries, {} MiB of data) with dd, directly (no instance):",
            plan.dir.display(),
            plan.inventory.entries,
            plan.inventory.data_bytes.div_ceil(1 << 20)
        ),
        format!(
            "  upload its {} byte archive as {blocks} blocks into an encrypted {} GiB snapshot (EBS direct APIs)",
            plan.archive_bytes, plan.snapshot_gib
        ),
    ];
    match history {
        History::SnapshotOnly => lines.push("  keep the snapshot; make no volume".into()),
        History::Snapshot => lines.push(format!(
            "  create a {} GiB gp3 volume from it in {}; keep both",
            plan.snapshot_gib, plan.zone
        )),
        History::Volume => lines.push(format!(
            "  create a {} GiB gp3 volume from it in {}, then delete the snapshot",
            plan.snapshot_gib, plan.zone
        )),
    }
    let mut kept = vec![format!("{} of PutSnapshotBlock calls", usd_small(api))];
    if let Some(v) = volume {
        kept.push(format!("the volume about ${v:.2} per month while kept"));
    }
    if snapshot_kept {
        kept.push(format!("the snapshot {} per month", usd_small(snapshot)));
    }
    lines.push(format!(
        "Estimated cost (us-east-1 list prices): {}.",
        kept.join("; ")
    ));
    lines.push("Nothing was created.".to_string());
    lines.join("\n")
}

/// "about $0.0123", or "under $0.0001" for what rounds to nothing.
fn usd_small(usd: f64) -> String {
    match usd < 0.0001 {
        true => "under $0.0001".to_string(),
        false => format!("about ${usd:.4}"),
    }
}
