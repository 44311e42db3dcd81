//! Writes the man pages and shell completions, generated from the same clap definitions as
//! the binary's own `--help`: `cargo run --bin ec2-backup-gen -- OUTDIR`.

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use ec2_backup::cli::Cli;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .unwrap_or_else(|| "target/doc-gen".into()),
    );
    std::fs::create_dir_all(out.join("man"))?;
    std::fs::create_dir_all(out.join("completions"))?;
    let top = Cli::command();
    let mut pages = vec![("ec2-backup".to_string(), top.clone())];
    for sub in top.get_subcommands() {
        let name: &'static str = Box::leak(format!("ec2-backup-{}", sub.get_name()).into());
        pages.push((name.to_string(), sub.clone().name(name)));
    }
    for (name, cmd) in pages {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        std::fs::write(out.join("man").join(format!("{name}.1")), page)?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(
            shell,
            &mut Cli::command(),
            "ec2-backup",
            out.join("completions"),
        )?;
    }
    eprintln!("wrote man pages and completions under {}", out.display());
    Ok(())
}
