//! `ec2-backup verify SOURCE DIR`: proves, trusting no tag, timestamp or size, that the backup
//! holds exactly DIR. dd: the archive streams back from the device into GNU tar's `--compare`
//! (file contents byte for byte, type, mode, owner, group, mtime, link targets, hard links),
//! the members it read are held against a walk of DIR (entries only in DIR), and the whole
//! archive's SHA-256 against its tag. rsync: a dry run from DIR onto the read-only mount with
//! whole-file checksums itemizes every difference, entries on either side only included.
//!
//! One line per difference on stdout, `WHAT: PATH` with the path relative to DIR as `./…`,
//! C-escaped (a newline or control byte in a name cannot forge a line).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::commands::source;
use crate::error::Error;
use crate::error::Failure;
use crate::method::{dd, rsync, Method, MethodError};
use crate::quote::c_escape;
use crate::select::Selection;
use crate::walk::Rules;

pub struct Options {
    pub source: String,
    pub dir: PathBuf,
    /// What the backup left out, as the user says it was made.
    pub selection: Selection,
}

impl Options {
    pub fn new(args: crate::cli::VerifyArgs) -> Result<Options, Error> {
        let s = &args.selection;
        Ok(Options {
            selection: Selection::new(&s.excludes, &s.exclude_from, s.one_file_system)?,
            source: args.source,
            dir: args.dir,
        })
    }
}

/// What verify found: the differences (empty: identical) and what cleanup left.
pub struct Verified {
    pub differences: Vec<String>,
    pub leftovers: Vec<String>,
}

pub async fn run(options: Options) -> Result<Verified, Failure> {
    source::check_id(&options.source)?;
    let dir = crate::walk::check_dir(&options.dir).map_err(Error::from)?;
    let rules = Rules::new(&dir, &options.selection);
    if let Some((backup, ebs, report)) = source::direct_snapshot(&options.source).await? {
        let mut signals = crate::signals::Signals::new()
            .map_err(|e| Error::Usage(format!("cannot handle signals: {e}")))?;
        let reader = source::Reader::Blocks {
            ebs: &ebs,
            snapshot: &backup.id,
        };
        let work = async {
            let mut lines: Vec<String> = selection_difference(&backup, rules.selection())
                .into_iter()
                .collect();
            lines.extend(compare_archive(&reader, &backup, &rules, &report).await?);
            Ok(lines)
        };
        let differences = source::guarded(&mut signals, work).await?;
        return Ok(Verified {
            differences,
            leftovers: Vec::new(),
        });
    }
    let mut opened = source::open(&options.source, |_| Ok(())).await?;
    let work = compare(&opened.lease, &opened.attached, &opened.backup, &rules);
    let result = source::guarded(&mut opened.signals, work).await;
    let (differences, leftovers) = source::close(opened, result).await?;
    Ok(Verified {
        differences,
        leftovers,
    })
}

async fn compare(
    lease: &crate::helper::lease::Lease<crate::cloud::aws::AwsCloud>,
    attached: &crate::helper::lease::Attached,
    backup: &source::Backup,
    rules: &Rules,
) -> Result<Vec<String>, Error> {
    let dir = rules.root();
    let ssh = lease.session().await?;
    let ssh = &*ssh;
    lease.report.step(&format!(
        "{} is {} on the helper; comparing",
        backup.id, attached.device
    ));
    let mut lines: Vec<String> = selection_difference(backup, rules.selection())
        .into_iter()
        .collect();
    let found: Result<Vec<String>, Error> = match backup.method {
        Method::Dd => {
            let reader = source::Reader::Helper {
                ssh,
                device: &attached.device,
            };
            compare_archive(&reader, backup, rules, &lease.report).await
        }
        Method::Rsync => {
            lease.ledger.record(crate::ledger::Resource::Mount(
                rsync::read::READ_POINT.into(),
            ));
            rsync::read::mount_read_only(ssh, &attached.device).await?;
            let left_out = crate::walk::exclusions(rules).await?;
            Ok(rsync::read::compare(ssh, dir, rsync::hide_rules(&left_out))
                .await?
                .into_iter()
                .map(|(what, path)| {
                    let raw = rsync_unescape(path.trim_end_matches('/'));
                    format!("{what}: {}", c_escape(&Path::new(".").join(raw)))
                })
                .collect())
        }
    };
    lines.extend(found?);
    Ok(lines)
}

/// The difference between what the backup recorded it left out and what this verify leaves
/// out, if any: with other excludes, entries one set leaves out and the other does not
/// would show as differences (or hide them).
fn selection_difference(backup: &source::Backup, ours: &Selection) -> Option<String> {
    let theirs = (backup.excludes_sha256.clone(), backup.one_file_system);
    if theirs == (ours.sha256(), ours.one_file_system) {
        return None;
    }
    let describe = |sha: &Option<String>, count: Option<usize>, one_fs: bool| {
        let mut text = match (sha, count) {
            (None, _) => "no excludes".to_string(),
            (Some(sha), Some(n)) => format!("{n} exclude patterns (SHA-256 {sha})"),
            (Some(sha), None) => format!("exclude patterns with SHA-256 {sha}"),
        };
        if one_fs {
            text.push_str(" and --one-file-system");
        }
        text
    };
    Some(format!(
        "excludes: the backup was made with {}, this verify uses {}",
        describe(&theirs.0, None, theirs.1),
        describe(
            &ours.sha256(),
            Some(ours.patterns().len()),
            ours.one_file_system
        )
    ))
}

/// A dd archive from `reader` held against `dir`: tar's `--compare` and `--list` on the same
/// stream, the entries only in `dir`, and the archive's SHA-256 against its tag.
async fn compare_archive(
    reader: &source::Reader<'_>,
    backup: &source::Backup,
    rules: &Rules,
    report: &crate::report::Reporter,
) -> Result<Vec<String>, Error> {
    let dir = rules.root();
    let sink = dd::read::Sink::Processes(vec![
        dd::read::compare_command(dir),
        dd::read::list_command(),
    ]);
    let bar = crate::commands::backup::progress_bar(backup.bytes.unwrap_or(0));
    let read = reader.read(backup.bytes, sink, &bar).await?;
    let [compared, listed] = &read.outputs[..] else {
        return Err(MethodError::Failed("tar did not compare the archive".into()).into());
    };
    // 0: no difference, 1: some; anything else: tar could not compare.
    for (out, what) in [(compared, "compare"), (listed, "list")] {
        let fine = matches!(out.status.code(), Some(0))
            || (what == "compare" && out.status.code() == Some(1));
        if !fine {
            return Err(MethodError::Failed(format!(
                "tar could not {what} the archive: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
            .into());
        }
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&compared.stdout),
        String::from_utf8_lossy(&compared.stderr)
    );
    let mut lines: Vec<String> = text.lines().filter_map(tar_difference).collect();
    let members: BTreeSet<PathBuf> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| dd::unescape(l.trim_end_matches('/')))
        .collect();
    for extra in only_in_dir(rules, &members)? {
        lines.push(format!("only in the directory: {}", c_escape(&extra)));
    }
    match &backup.sha256 {
        Some(sum) if *sum != read.sha256 => lines.push(format!(
            "checksum: the archive's SHA-256 is {} but its tag says {sum}",
            read.sha256
        )),
        Some(_) => {}
        None => report.warn(&format!(
            "{} has no recorded checksum: only its members were compared",
            backup.id
        )),
    }
    Ok(lines)
}

/// One of `tar --compare`'s lines as `WHAT: PATH`; None for lines that are not a difference.
fn tar_difference(line: &str) -> Option<String> {
    let line = line.strip_prefix("tar: ").unwrap_or(line);
    const KINDS: &[(&str, &str)] = &[
        (": Contents differ", "content"),
        (": Size differs", "content"),
        (": Mode differs", "mode"),
        (": Uid differs", "owner"),
        (": Gid differs", "group"),
        (": Mod time differs", "mtime"),
        (": Symlink differs", "link target"),
        (": File type differs", "type"),
        (": Device number differs", "device"),
        (
            ": Warning: Cannot stat: No such file or directory",
            "only in the backup",
        ),
        (
            ": Cannot stat: No such file or directory",
            "only in the backup",
        ),
    ];
    for (suffix, what) in KINDS {
        if let Some(name) = line.strip_suffix(suffix) {
            return Some(format!("{what}: {}", c_escape(&dd::unescape(name))));
        }
    }
    if let Some((name, _)) = line.split_once(": Not linked to ") {
        return Some(format!("hard link: {}", c_escape(&dd::unescape(name))));
    }
    None
}

/// Entries the rules take in (as `./…` paths) that are not among the archive's members;
/// what is below such a directory is not listed again.
fn only_in_dir(rules: &Rules, members: &BTreeSet<PathBuf>) -> Result<Vec<PathBuf>, Error> {
    let mut extra = Vec::new();
    crate::walk::list::list(rules, |rel, _| {
        let path = Path::new(".").join(rel);
        if rel.as_os_str().is_empty() || members.contains(&path) {
            return Ok(true);
        }
        extra.push(path);
        Ok(false)
    })
    .map_err(|e| MethodError::Failed(format!("listing {} failed: {e}", rules.root().display())))?;
    extra.sort();
    Ok(extra)
}

/// Undoes rsync's escaping of names in its output: `\#ooo` is the byte of octal ooo.
fn rsync_unescape(name: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i..i + 5).filter(|w| {
            w[0] == b'\\' && w[1] == b'#' && w[2..].iter().all(|c| (b'0'..=b'7').contains(c))
        });
        if let Some(w) = octal {
            out.push(
                w[2..]
                    .iter()
                    .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
            );
            i += 5;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    std::ffi::OsString::from_vec(out).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_lines_become_differences_and_names_stay_inert() {
        assert_eq!(
            tar_difference("./a\\:b c: Mod time differs").as_deref(),
            Some("mtime: ./a:b c")
        );
        assert_eq!(
            tar_difference("./x\\ny: Contents differ").as_deref(),
            Some("content: ./x\\ny")
        );
        assert_eq!(
            tar_difference("tar: ./gone: Warning: Cannot stat: No such file or directory")
                .as_deref(),
            Some("only in the backup: ./gone")
        );
        assert_eq!(
            tar_difference("./g: Not linked to ./f").as_deref(),
            Some("hard link: ./g")
        );
        assert_eq!(tar_difference("./plain"), None);
    }

    #[test]
    fn entries_only_in_the_directory_are_found_once() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir_all(root.join("kept/new")).unwrap();
        std::fs::write(root.join("kept/f"), b"x").unwrap();
        std::fs::write(root.join("kept/new/g"), b"x").unwrap();
        std::fs::write(root.join("kept/x.o"), b"x").unwrap();
        let members: BTreeSet<PathBuf> = [".", "./kept", "./kept/f"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let none = Rules::new(&root, &Selection::default());
        assert_eq!(
            only_in_dir(&none, &members).unwrap(),
            [PathBuf::from("./kept/new"), PathBuf::from("./kept/x.o")]
        );
        // What the excludes leave out is not missing from the backup.
        let selection = Selection::new(&["*.o".into()], &[], false).unwrap();
        assert_eq!(
            only_in_dir(&Rules::new(&root, &selection), &members).unwrap(),
            [PathBuf::from("./kept/new")]
        );
    }

    #[test]
    fn rsync_escapes_are_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let p = rsync_unescape("a\\#012b\\#377");
        assert_eq!(p.as_os_str().as_bytes(), b"a\nb\xff");
    }
}
