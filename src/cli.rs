//! The command line, as `ec2-backup [-h] [-m method] [-v volume-id] dir`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const ABOUT: &str = "Back up a directory into an Amazon EBS volume.

ec2-backup makes a volume (or reuses the one given with -v), lends it to a short-lived EC2 \
helper instance, streams the directory onto it over ssh, terminates the helper and prints \
the volume ID on stdout. Nothing else is ever printed on stdout.";

const AFTER: &str = "Methods:
  dd      the directory becomes a tar archive written raw at byte 0 of the volume
          (read it back with: dd if=DEVICE | tar -t)
  rsync   the directory is mirrored onto an ext4 filesystem on the volume (made if the
          volume has none); reusing a volume with -v is incremental and mirrors deletions

Excludes (--exclude PATTERN, --exclude-from FILE; verify takes the same):
  gitignore syntax, matched against paths relative to dir: a pattern without / matches a
  name at any depth (*.log), a leading or inner / anchors it at dir (/tmp, a/b), a
  trailing / matches directories only (cache/), * and ? do not match /, ** does; \\
  escapes. What a pattern matches is left out with all below it; ! is not supported.
  An rsync mirror loses what is excluded on its next run (lost+found stays).

Environment:
  EC2_BACKUP_FLAGS_AWS     extra helper launch flags in `aws ec2 run-instances` spelling:
                           --instance-type --key-name --subnet-id --security-group-ids
                           --iam-instance-profile --image-id
  EC2_BACKUP_FLAGS_SSH     extra flags for every ssh (and rsync's ssh), e.g. -i ~/.ssh/other
  EC2_BACKUP_VERBOSE       when set, report each step on stderr
  EC2_BACKUP_BOOT_TIMEOUT  seconds the helper may take to accept ssh (default 300)
  EC2_BACKUP_WATCHDOG_SECONDS  the helper powers itself off (taking the run's own volume
                           with it) this long after the run's last heartbeat (default 300)
  EC2_BACKUP_SNAPSHOT_TIMEOUT  seconds --snapshot waits for the snapshot (default 10800)
  EC2_BACKUP_SSH_CIDR      the address allowed to reach the helper's ssh port (default:
                           this machine's address as the helper sees it: the route's
                           source, or checkip.amazonaws.com's answer behind NAT)
  AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL, ...  the standard AWS configuration

Other commands (a directory named like one is backed up as ./NAME):
  ec2-backup restore SOURCE DIR|-   bring a backup back (or a dd archive to stdout)
  ec2-backup verify SOURCE DIR      prove a backup holds exactly DIR (exit 5: it does not)
  ec2-backup list [--json]          the backups in the region
  ec2-backup gc [--yes]             find (and remove) what killed runs left behind
  ec2-backup prune --keep-daily 7 [--yes]  delete old backups by a retention policy

Exit status: 0 done; 1 failed (cleaned up); 2 bad input (nothing created);
3 some files unreadable or changed while read (the rest is on the printed volume);
4 cleanup incomplete; 5 verify: they differ;
6 --snapshot: the backup is on the printed volume, its snapshot failed (and was removed);
128+N interrupted by signal N.";

/// `ec2-backup [options] dir` backs up; `ec2-backup COMMAND ...` runs another command. A
/// directory named like a command is backed up when given as a path (`./gc`).
#[derive(Debug, Parser)]
#[command(
    name = "ec2-backup",
    version,
    about = "Back up a directory into an Amazon EBS volume",
    override_usage = "ec2-backup [-h] [-m method] [-v volume-id] [--overwrite] [--json] [--dry-run]\n                  [--snapshot | --snapshot-only] [--direct] [--kms-key-id KEY]\n                  [--exclude PATTERN]... [--exclude-from FILE]... [--one-file-system] dir\n       ec2-backup restore SOURCE DIR|- [--path SUB]...\n       ec2-backup verify SOURCE DIR [--exclude PATTERN]... [--exclude-from FILE]... [--one-file-system]\n       ec2-backup list [--json]\n       ec2-backup gc [--yes] [--older-than HOURS]\n       ec2-backup prune --keep-last N [--keep-daily N ...] [--yes]\n       ec2-backup --version",
    long_about = ABOUT,
    after_help = AFTER,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub backup: BackupArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Restore(RestoreArgs),
    Verify(VerifyArgs),
    List(ListArgs),
    Gc(GcArgs),
    Prune(PruneArgs),
}

/// `ec2-backup restore SOURCE DIR|- [--path SUB]...`
#[derive(Debug, Args)]
#[command(
    about = "Bring a backup back into a directory (or a dd archive to stdout)",
    long_about = "Bring a backup back: SOURCE is a backup volume's or snapshot's ID (either \
method; a snapshot is read through a temporary volume, deleted at the end). DIR is made, or \
must be empty. Run as root to get owners back. The volume is only read (read-only device, \
read-only mount). With DIR '-', a dd backup's tar archive goes to stdout, for \
'| tar -t' or '| tar -x'. A dd archive's SHA-256 is checked against its tag as it streams."
)]
pub struct RestoreArgs {
    /// The backup: a volume or snapshot ID
    #[arg(value_name = "SOURCE")]
    pub source: String,

    /// Where to restore to (made, or empty), or - for a dd archive on stdout
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Restore only this path of the backup (relative to its root; repeatable)
    #[arg(long = "path", value_name = "SUB")]
    pub paths: Vec<PathBuf>,
}

/// `ec2-backup verify SOURCE DIR [--exclude PATTERN]...`
#[derive(Debug, Args)]
#[command(
    about = "Prove that a backup holds exactly a directory",
    long_about = "Prove, trusting no tag, timestamp or size, that the backup SOURCE holds \
exactly DIR: contents (dd: byte for byte; rsync: whole-file checksums), type, mode, owners, \
mtimes, link targets, hard links, entries only on one side. One line per difference on stdout \
('WHAT: ./PATH', names C-escaped). Give the --exclude, --exclude-from and --one-file-system \
options the backup was made with: what they leave out of DIR is not compared, and a set that \
differs from the one the backup recorded is itself a difference. Exit 0: identical; 5: they \
differ; 1: could not check."
)]
pub struct VerifyArgs {
    /// The backup: a volume or snapshot ID
    #[arg(value_name = "SOURCE")]
    pub source: String,

    /// The directory to compare it with
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    #[command(flatten)]
    pub selection: SelectionArgs,
}

/// What of the directory a backup holds; backup and verify take the same options.
#[derive(Debug, Clone, Default, Args)]
pub struct SelectionArgs {
    /// Leave out what PATTERN matches: gitignore syntax, relative to dir (`*.log`, `/tmp`,
    /// `cache/`, `**/build`); repeatable
    #[arg(long = "exclude", value_name = "PATTERN")]
    pub excludes: Vec<OsString>,

    /// Leave out what the patterns in FILE match (one a line, as in a .gitignore; blank
    /// lines and lines starting with # are skipped); repeatable
    #[arg(long = "exclude-from", value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,

    /// Do not descend into other filesystems mounted below dir (their mount points are kept,
    /// empty)
    #[arg(long = "one-file-system")]
    pub one_file_system: bool,
}

/// `ec2-backup list [--json]`
#[derive(Debug, Args)]
#[command(about = "List the backups in the region, newest first")]
pub struct ListArgs {
    /// One JSON array of objects (id, kind, method, source_host, source_dir, finished,
    /// size_gib, bytes, complete)
    #[arg(long)]
    pub json: bool,
}

/// The backup: `ec2-backup [-m method] [-v volume-id] dir`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Backup method: dd (default) or rsync
    #[arg(short = 'm', value_name = "method", default_value = "dd")]
    pub method: String,

    /// Back up into this existing volume instead of creating one
    #[arg(short = 'v', value_name = "volume-id")]
    pub volume: Option<String>,

    /// Print one JSON object (volume ID, bytes, checksum, duration, costs) instead of the
    /// bare volume ID
    #[arg(long)]
    pub json: bool,

    /// Show what would be created and roughly what it costs; create nothing
    #[arg(long)]
    pub dry_run: bool,

    /// With -v: write the volume even though it holds something ec2-backup did not write
    /// there (a filesystem of your own, a partition table, unknown data, a backup of the
    /// other method). What it holds is destroyed.
    #[arg(long, requires = "volume")]
    pub overwrite: bool,

    /// After the backup, take an EBS snapshot of the volume (a point of history; with -v,
    /// also of the backup the volume held, if it has none yet) and wait until it is completed
    #[arg(long)]
    pub snapshot: bool,

    /// As --snapshot, then delete the volume this run created: the snapshot is the backup,
    /// and stdout carries its ID (not with -v)
    #[arg(long, conflicts_with = "volume")]
    pub snapshot_only: bool,

    /// No instance: upload the dd archive straight into an EBS snapshot (EBS direct APIs),
    /// then make the volume from it (with --snapshot keep both; --snapshot-only keeps only
    /// the snapshot). Not with -v or -m rsync
    #[arg(long, conflicts_with = "volume")]
    pub direct: bool,

    /// Encrypt the volumes this run creates (and so their snapshots) with this KMS key (ID,
    /// ARN or alias; default: the region's default EBS key)
    #[arg(long, value_name = "key-id")]
    pub kms_key_id: Option<String>,
    #[command(flatten)]
    pub selection: SelectionArgs,

    /// The directory to back up
    #[arg(value_name = "dir", required = true)]
    pub dir: Option<PathBuf>,
}

/// `ec2-backup prune --keep-last N [--keep-hourly/daily/weekly/monthly/yearly N] [--yes]`
#[derive(Debug, Args)]
#[command(
    override_usage = "ec2-backup prune [--keep-last N] [--keep-hourly N] [--keep-daily N] [--keep-weekly N] [--keep-monthly N] [--keep-yearly N] [--yes]",
    about = "Delete old backups by a retention policy (restic's forget rules)",
    long_about = "Delete old backups by a retention policy, restic's 'forget' rules: per group \
(source host, exact directory, method; snapshots and volumes counted apart) keep the N newest \
(--keep-last) and the newest of each of the last N hours, days, ISO weeks, months and years \
that hold a backup (UTC, by the backup's finish time). Incomplete backups count toward no rule. \
The newest backup of a group is always kept. Only snapshots a run kept and volumes a run \
created are considered: never a snapshot you took, a volume named with -v, or anything \
untagged. Without --yes, only lists what it would delete and why."
)]
pub struct PruneArgs {
    /// Keep the N newest backups
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest backup of each of the last N hours that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest backup of each of the last N days that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest backup of each of the last N ISO weeks that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest backup of each of the last N months that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u32,
    /// Keep the newest backup of each of the last N years that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: u32,
    /// Delete what the policy does not keep (without it, only show)
    #[arg(long)]
    pub yes: bool,
}

/// `ec2-backup gc [--yes] [--older-than HOURS]`
#[derive(Debug, Args)]
#[command(
    override_usage = "ec2-backup gc [--yes] [--older-than HOURS]",
    about = "Find, and with --yes remove, what killed ec2-backup runs left behind",
    long_about = "Find, and with --yes remove, what killed ec2-backup runs (kill -9, power loss) \
left behind: helper instances, temporary security groups, and volumes a run created whose \
backup never completed. Completed backups, volumes named with -v and anything the tool did not \
tag are never touched. A run started on this machine counts as abandoned when its process is \
gone; a run from another machine when it is older than --older-than."
)]
pub struct GcArgs {
    /// Remove what was found (without it, only show)
    #[arg(long)]
    pub yes: bool,

    /// Age after which a run from another host counts as abandoned
    #[arg(long, value_name = "HOURS", default_value_t = 24)]
    pub older_than: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_classic_line() {
        let c =
            Cli::try_parse_from(["ec2-backup", "-m", "rsync", "-v", "vol-1a2b3c4d", "."]).unwrap();
        assert!(c.command.is_none());
        assert_eq!(c.backup.method, "rsync");
        assert_eq!(c.backup.volume.as_deref(), Some("vol-1a2b3c4d"));
        assert_eq!(c.backup.dir, Some(PathBuf::from(".")));
        let c = Cli::try_parse_from(["ec2-backup", "/"]).unwrap();
        assert_eq!(c.backup.method, "dd");
        assert!(Cli::try_parse_from(["ec2-backup"]).is_err());
        assert!(Cli::try_parse_from(["ec2-backup", "-x", "."]).is_err());
    }

    #[test]
    fn excludes_repeat_and_take_values_that_look_like_options() {
        let c = Cli::try_parse_from([
            "ec2-backup",
            "--exclude",
            "*.o",
            "--exclude=-dash",
            "--exclude-from",
            "/etc/ex",
            "--one-file-system",
            ".",
        ])
        .unwrap();
        let s = &c.backup.selection;
        assert_eq!(s.excludes, [OsString::from("*.o"), OsString::from("-dash")]);
        assert_eq!(s.exclude_from, [PathBuf::from("/etc/ex")]);
        assert!(s.one_file_system);
        let c =
            Cli::try_parse_from(["ec2-backup", "verify", "vol-1", ".", "--exclude", "x"]).unwrap();
        assert!(matches!(c.command, Some(Command::Verify(v)) if v.selection.excludes.len() == 1));
    }

    #[test]
    fn commands_and_directories_named_like_them() {
        let c = Cli::try_parse_from(["ec2-backup", "gc", "--yes"]).unwrap();
        assert!(matches!(
            c.command,
            Some(Command::Gc(GcArgs { yes: true, .. }))
        ));
        let c = Cli::try_parse_from(["ec2-backup", "./gc"]).unwrap();
        assert!(c.command.is_none());
        assert_eq!(c.backup.dir, Some(PathBuf::from("./gc")));
        // Backup options do not mix with a command.
        assert!(Cli::try_parse_from(["ec2-backup", "-m", "rsync", "gc"])
            .is_ok_and(|c| c.command.is_none()));
    }
}
