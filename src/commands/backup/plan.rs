//! A backup, decided before anything is created: the options of the command line, the
//! directory's inventory, the `-v` volume's checks, and the helper (see
//! [`crate::helper::plan`]). Bad input fails here, with nothing made.

use std::path::PathBuf;

use crate::cloud::{Cloud, Volume};
use crate::error::Error;
use crate::helper::plan::{self as helper_plan, find_volume, HelperOptions, HelperPlan, Pinned};
use crate::method::{Method, Source};
use crate::report::Reporter;
use crate::select::Selection;
use crate::walk::{self, Inventory, Rules};

/// What the user asked for, read from the command line and the environment.
#[derive(Debug, Clone)]
pub struct Options {
    pub method: Method,
    pub volume: Option<String>,
    pub dir: PathBuf,
    pub json: bool,
    pub dry_run: bool,
    /// Write a `-v` volume whatever it holds.
    pub overwrite: bool,
    pub history: History,
    /// Through the EBS direct APIs, with no instance (`--direct`).
    pub direct: bool,
    /// How long the run waits for its snapshot to complete.
    pub snapshot_limit: std::time::Duration,
    /// The KMS key for the volumes this run creates (None: the region's default).
    pub kms_key_id: Option<String>,
    /// What of the directory the backup holds.
    pub selection: Selection,
    pub helper: HelperOptions,
}

/// What the run keeps besides the volume (`--snapshot`, `--snapshot-only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// The volume only.
    Volume,
    /// The volume and a completed snapshot of it.
    Snapshot,
    /// A completed snapshot; the volume this run made is deleted.
    SnapshotOnly,
}

impl Options {
    /// Builds the options from the parsed command line and the process environment.
    pub fn new(cli: crate::cli::BackupArgs) -> Result<Self, Error> {
        let crate::cli::BackupArgs {
            method,
            volume,
            dir,
            json,
            dry_run,
            overwrite,
            snapshot,
            snapshot_only,
            kms_key_id,
            direct,
            selection,
        } = cli;
        let history = match (snapshot, snapshot_only) {
            (_, true) => History::SnapshotOnly,
            (true, false) => History::Snapshot,
            (false, false) => History::Volume,
        };
        if let Some(k) = &kms_key_id {
            if k.trim().is_empty() || k.chars().any(char::is_whitespace) {
                return Err(Error::Usage(format!(
                    "--kms-key-id '{k}' is not a KMS key ID, ARN or alias"
                )));
            }
        }
        let method = Method::parse(&method).ok_or_else(|| {
            Error::Usage(format!("unknown method '{method}': use -m dd or -m rsync"))
        })?;
        if let Some(v) = &volume {
            helper_plan::check_volume_id(v)?;
        }
        if direct && method != Method::Dd {
            return Err(Error::Usage(
                "--direct writes a dd archive: it does not go with -m rsync".into(),
            ));
        }
        let dir = dir.ok_or_else(|| Error::Usage("the directory to back up is missing".into()))?;
        let selection = Selection::new(
            &selection.excludes,
            &selection.exclude_from,
            selection.one_file_system,
        )?;
        Ok(Options {
            method,
            volume,
            dir,
            json,
            dry_run,
            overwrite,
            history,
            direct,
            snapshot_limit: crate::history::snapshot::limit_from_env().map_err(Error::Usage)?,
            kms_key_id,
            selection,
            helper: HelperOptions::from_env()?,
        })
    }
}

/// The decided run: nothing of it exists yet.
#[derive(Debug, Clone)]
pub struct Plan {
    pub dir: PathBuf,
    pub inventory: Inventory,
    /// The dd archive's exact length, measured when it must fit a `-v` volume.
    pub archive_bytes: Option<u64>,
    /// The user's volume (`-v`), already checked.
    pub existing_volume: Option<Volume>,
    /// Size of the volume to create when there is no `-v`.
    pub new_volume_gib: i32,
    pub helper: HelperPlan,
}

/// What is checked before any cloud call: the directory, and the public keys of the
/// identities the ssh flags name. (The directory's inventory is taken while the cloud
/// lookups run.)
#[derive(Debug, Clone)]
pub struct Local {
    pub dir: PathBuf,
    pub extra_authorized_keys: Vec<String>,
}

/// Checks the directory and what can be checked locally, before any cloud call.
pub fn check_local(options: &Options, report: &Reporter) -> Result<Local, Error> {
    Ok(Local {
        dir: walk::check_dir(&options.dir)?,
        extra_authorized_keys: options.helper.extra_authorized_keys(report)?,
    })
}

/// The sizing walk, on a thread of its own so the cloud lookups go on meanwhile.
pub(super) async fn take_inventory(rules: &Rules, report: &Reporter) -> Result<Inventory, Error> {
    report.step(&format!("sizing {}", rules.root().display()));
    let inventory = walk::inventory_in_thread(rules).await?;
    let excluded = match inventory.excluded.len() {
        0 => String::new(),
        n => format!(" ({n} paths excluded)"),
    };
    report.step(&format!(
        "{} entries, {} bytes of data{excluded}",
        inventory.entries, inventory.data_bytes
    ));
    Ok(inventory)
}

/// The cloud lookups that decide the run, at once: the sizing walk, the `-v` volume, and
/// the helper (pinned to the volume's zone).
pub async fn decide<C: Cloud>(
    cloud: &C,
    region: &str,
    options: &Options,
    local: Local,
    report: &Reporter,
) -> Result<Plan, Error> {
    let Local {
        dir,
        extra_authorized_keys,
    } = local;
    // A dd archive must fit a `-v` volume exactly; its length is measured after the walk,
    // by an archive of what the same rules take in.
    let measure = options.volume.is_some() && options.method == Method::Dd;
    let sizing = async {
        let source = Source::new(&dir, &options.selection);
        let inventory = take_inventory(&source.rules, report).await?;
        if !measure {
            return Ok::<_, Error>((inventory, None));
        }
        let bytes = crate::method::dd::archive_size(&source).await?;
        report.step(&format!("the archive will be {bytes} bytes"));
        Ok((inventory, Some(bytes)))
    };
    // The helper's lookups wait for the volume's (its zone pins the helper); the walk goes
    // on beside both.
    let volume_and_helper = async {
        let volume = match &options.volume {
            Some(id) => Some(find_volume(cloud, region, id).await?),
            None => None,
        };
        let pinned = volume.as_ref().map(|v| Pinned {
            zone: v.zone.clone(),
            volume_id: v.id.clone(),
        });
        let helper = helper_plan::decide(
            cloud,
            region,
            &options.helper,
            extra_authorized_keys,
            std::future::ready(Ok(pinned)),
            report,
        )
        .await?;
        Ok::<_, Error>((volume, helper))
    };
    let (sizing, volume_and_helper) = tokio::join!(sizing, volume_and_helper);
    let (volume, helper) = volume_and_helper?;
    let (inventory, archive_bytes) = sizing?;
    let existing_volume = match volume {
        Some(v) => Some(check_volume(v, &inventory, archive_bytes, options.method)?),
        None => None,
    };
    Ok(Plan {
        new_volume_gib: walk::volume_gib(inventory.footprint),
        dir,
        inventory,
        archive_bytes,
        existing_volume,
        helper,
    })
}

/// A `-v` volume must be free and big enough: for dd, for the archive's measured length
/// (`archive`); for rsync, roughly here, exactly once its filesystem is mounted.
fn check_volume(
    v: Volume,
    inventory: &Inventory,
    archive: Option<u64>,
    method: Method,
) -> Result<Volume, Error> {
    helper_plan::check_free(&v)?;
    let (fits, needed) = match archive {
        Some(bytes) => (crate::method::dd::archive_fits(bytes, v.size_gib), bytes),
        None => (
            walk::fits(inventory.footprint, v.size_gib, method.uses_filesystem()),
            inventory.footprint,
        ),
    };
    if !fits {
        return Err(Error::Invalid(format!(
            "the volume {} has {} GiB, too small for this directory (about {} MiB needed)",
            v.id,
            v.size_gib,
            needed.div_ceil(1 << 20)
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_volumes_must_be_free_and_big_enough() {
        let inv = Inventory {
            footprint: 3 << 30,
            ..Inventory::default()
        };
        let v = |state: &str, size| Volume {
            id: "vol-1".into(),
            state: state.into(),
            size_gib: size,
            zone: "z".into(),
            attachments: vec![],
            tags: Default::default(),
        };
        assert!(check_volume(v("available", 4), &inv, None, Method::Dd).is_ok());
        let e = check_volume(v("in-use", 4), &inv, None, Method::Dd).unwrap_err();
        assert!(e.to_string().contains("in-use"), "{e}");
        let e = check_volume(v("available", 2), &inv, None, Method::Dd).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        // The measured archive decides for dd, whatever the rough footprint says: 1 GiB of
        // archive does not fit 1 GiB (no room for its last record and growth).
        let small = Inventory::default();
        assert!(check_volume(v("available", 1), &small, Some(1 << 30), Method::Dd).is_err());
        assert!(check_volume(v("available", 1), &small, Some(1000 << 20), Method::Dd).is_ok());
    }
}
