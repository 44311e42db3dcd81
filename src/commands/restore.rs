//! `ec2-backup restore SOURCE DIR|- [--path SUB]...`: the backup comes back into DIR (made,
//! or empty), read-only from the volume. dd: the archive streams from the device into a local
//! `tar --extract`, its SHA-256 checked against the tag as it goes; `-` writes the archive to
//! stdout instead. rsync: the mirror is copied from a read-only mount.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::commands::source;
use crate::error::Error;
use crate::error::Failure;
use crate::method::{dd, rsync, Method, MethodError};

/// What to restore and where.
pub struct Options {
    pub source: String,
    /// None: the archive to stdout.
    pub dir: Option<PathBuf>,
    /// Only these subtrees (relative to the backup's root).
    pub paths: Vec<OsString>,
}

/// A finished restore.
pub struct Restored {
    pub bytes: u64,
    /// Run as another user than root: files belong to the user, not their recorded owners.
    pub owners_lost: bool,
    pub leftovers: Vec<String>,
}

/// Checks the options before any cloud call: the ID, the directory (made if missing, else it
/// must be empty), the paths (relative, inside the backup).
pub fn check(options: &Options) -> Result<(), Error> {
    source::check_id(&options.source)?;
    for p in &options.paths {
        let path = Path::new(p);
        if path.as_os_str().is_empty()
            || path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(Error::Usage(format!(
                "--path {} must be a path inside the backup, relative to its root",
                path.display()
            )));
        }
    }
    let Some(dir) = &options.dir else {
        if !options.paths.is_empty() {
            return Err(Error::Usage(
                "--path cannot be used when the archive goes to stdout".into(),
            ));
        }
        return Ok(());
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::Usage(format!(
                    "{} is not empty; restore into an empty or new directory",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
            match parent {
                Some(p) if !p.is_dir() => Err(Error::Usage(format!(
                    "cannot make {}: {} is not a directory",
                    dir.display(),
                    p.display()
                ))),
                _ => Ok(()),
            }
        }
        Err(e) => Err(Error::Usage(format!(
            "{} cannot be read: {e}",
            dir.display()
        ))),
    }
}

pub async fn run(options: Options) -> Result<Restored, Failure> {
    check(&options)?;
    let to_stdout = options.dir.is_none();
    if let Some((backup, ebs, report)) = source::direct_snapshot(&options.source).await? {
        let mut signals = crate::signals::Signals::new()
            .map_err(|e| Error::Usage(format!("cannot handle signals: {e}")))?;
        let reader = source::Reader::Blocks {
            ebs: &ebs,
            snapshot: &backup.id,
        };
        let work = restore_archive(&reader, &backup, &options, &report);
        let bytes = source::guarded(&mut signals, work)
            .await
            .map_err(|e| partial(e, options.dir.as_deref()))?;
        return Ok(Restored {
            bytes,
            owners_lost: options.dir.is_some() && unsafe { libc::geteuid() } != 0,
            leftovers: Vec::new(),
        });
    }
    let mut opened = source::open(&options.source, |backup| {
        if to_stdout && backup.method == Method::Rsync {
            return Err(Error::Usage(format!(
                "{} is an rsync backup (a filesystem, not an archive): restore it into a directory",
                backup.id
            )));
        }
        Ok(())
    })
    .await?;
    let work = restore(&opened.lease, &opened.attached, &opened.backup, &options);
    let result = source::guarded(&mut opened.signals, work).await;
    let result = result.map_err(|e| partial(e, options.dir.as_deref()));
    let (bytes, leftovers) = source::close(opened, result).await?;
    Ok(Restored {
        bytes,
        owners_lost: options.dir.is_some() && unsafe { libc::geteuid() } != 0,
        leftovers,
    })
}

/// A restore that failed after DIR was written to says so: what is there is partial.
fn partial(e: Error, dir: Option<&Path>) -> Error {
    match dir {
        Some(d) if d.exists() => Error::Partial {
            error: Box::new(e),
            dir: d.to_path_buf(),
        },
        _ => e,
    }
}

async fn restore(
    lease: &crate::helper::lease::Lease<crate::cloud::aws::AwsCloud>,
    attached: &crate::helper::lease::Attached,
    backup: &source::Backup,
    options: &Options,
) -> Result<u64, Error> {
    let ssh = lease.session().await?;
    let ssh = &*ssh;
    lease.report.step(&format!(
        "{} is {} on the helper; restoring",
        backup.id, attached.device
    ));
    match backup.method {
        Method::Dd => {
            let reader = source::Reader::Helper {
                ssh,
                device: &attached.device,
            };
            restore_archive(&reader, backup, options, &lease.report).await
        }
        Method::Rsync => {
            make_dir(options)?;
            let dir = options.dir.as_deref().unwrap_or(Path::new("."));
            lease.ledger.record(crate::ledger::Resource::Mount(
                rsync::read::READ_POINT.into(),
            ));
            rsync::read::mount_read_only(ssh, &attached.device).await?;
            rsync::read::restore(ssh, dir, &options.paths).await?;
            Ok(0)
        }
    }
}

fn make_dir(options: &Options) -> Result<(), Error> {
    if let Some(dir) = &options.dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| MethodError::Failed(format!("cannot make {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// A dd archive from `reader` into a local `tar --extract` (or stdout), its SHA-256 checked
/// against the tag as it streams.
async fn restore_archive(
    reader: &source::Reader<'_>,
    backup: &source::Backup,
    options: &Options,
    report: &crate::report::Reporter,
) -> Result<u64, Error> {
    make_dir(options)?;
    let sink = match &options.dir {
        Some(dir) => dd::read::Sink::Processes(vec![dd::read::extract_command(
            dir,
            &members(&options.paths),
        )]),
        None => dd::read::Sink::Stdout,
    };
    let bar = crate::commands::backup::progress_bar(backup.bytes.unwrap_or(0));
    let read = reader.read(backup.bytes, sink, &bar).await?;
    if let Some(out) = read.outputs.first() {
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            crate::report::say(stderr.trim_end());
            return Err(MethodError::Failed(format!(
                "tar could not extract everything ({})",
                out.status
            ))
            .into());
        }
    }
    match &backup.sha256 {
        Some(sum) if *sum != read.sha256 => Err(MethodError::Failed(format!(
            "the archive read back from {} has SHA-256 {} but its tag says {sum}: the backup changed or is damaged, and what was restored cannot be trusted",
            backup.id, read.sha256
        ))
        .into()),
        Some(_) => Ok(read.bytes),
        None => {
            report.warn(&format!(
                "{} has no recorded checksum: the archive could not be checked",
                backup.id
            ));
            Ok(read.bytes)
        }
    }
}

/// The archive's member names for `paths` (members start with `./`).
fn members(paths: &[OsString]) -> Vec<OsString> {
    paths
        .iter()
        .map(|p| {
            let mut m = OsString::from("./");
            m.push(Path::new(p).strip_prefix("./").unwrap_or(Path::new(p)));
            m
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: Option<&Path>, paths: &[&str]) -> Options {
        Options {
            source: "vol-0123456789abcdef0".into(),
            dir: dir.map(Path::to_path_buf),
            paths: paths.iter().map(OsString::from).collect(),
        }
    }

    #[test]
    fn a_directory_must_be_new_or_empty_and_paths_inside() {
        let d = tempfile::tempdir().unwrap();
        assert!(check(&opts(Some(d.path()), &[])).is_ok());
        assert!(check(&opts(Some(&d.path().join("new")), &["etc/ssh"])).is_ok());
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let e = check(&opts(Some(d.path()), &[])).unwrap_err();
        assert!(e.to_string().contains("is not empty"), "{e}");
        assert_eq!(e.exit_code(), 2);
        assert!(check(&opts(Some(&d.path().join("f/x")), &[])).is_err());
        for bad in ["/etc", "../x", "a/../../b", ""] {
            assert!(check(&opts(None, &[])).is_ok());
            assert!(
                check(&opts(Some(&d.path().join("n")), &[bad])).is_err(),
                "{bad}"
            );
        }
        assert!(check(&opts(None, &["etc"])).is_err());
        let mut o = opts(None, &[]);
        o.source = "snap-1".into();
        assert!(check(&o).is_err());
    }

    #[test]
    fn members_are_named_as_in_the_archive() {
        let m = members(&["etc/ssh".into(), "./a b".into()]);
        assert_eq!(m, [OsString::from("./etc/ssh"), OsString::from("./a b")]);
    }
}
