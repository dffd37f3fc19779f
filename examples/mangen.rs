//! Writes the man pages, rendered from the clap definitions so they never
//! drift from `--help`: `blkshim.1` and one page per subcommand, named by
//! its full path (`blkshim-serve.1`, `blkshim-ctl-status.1`, ...) so that
//! `man blkshim-serve` finds it.
//!
//! `cargo run --example mangen -- DIR` (`packaging/build-deb.sh` runs it).
//! An example rather than a binary or a hidden subcommand: clap_mangen is
//! then a dev-dependency only, and neither the shipped `blkshim` nor
//! `cargo install --path .` carries or installs it.

fn main() -> std::io::Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::args_os()
            .nth(1)
            .unwrap_or_else(|| "target/man".into()),
    );
    std::fs::create_dir_all(&dir)?;
    clap_mangen::generate_to(blkshim::control::cli::command(), &dir)?;
    println!("man pages in {}", dir.display());
    Ok(())
}
