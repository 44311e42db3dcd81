//! The sizing walk alone: what ec2-backup's walk finds in a directory and how long it takes,
//! without the cloud lookups a run does meanwhile. scripts/bench times it beside `du -s`.
//!
//!     cargo run --release --example walk -- DIR
//!
//! Prints one line: `walk SECONDS ENTRIES DATA_BYTES FOOTPRINT_BYTES`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: walk DIR");
        return ExitCode::from(2);
    };
    let dir = match ec2_backup::walk::check_dir(&dir) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("walk: {e}");
            return ExitCode::from(1);
        }
    };
    let start = Instant::now();
    let inv =
        match ec2_backup::walk::inventory(&ec2_backup::walk::Rules::new(&dir, &Default::default()))
        {
            Ok(inv) => inv,
            Err(e) => {
                eprintln!("walk: {e}");
                return ExitCode::from(1);
            }
        };
    let took = start.elapsed().as_secs_f64();
    println!(
        "walk {took:.4} {} {} {}",
        inv.entries, inv.data_bytes, inv.footprint
    );
    ExitCode::SUCCESS
}
