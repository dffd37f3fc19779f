//! The `blkshim` command line.

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = blkshim::control::cli::run() {
        log::error!("{e}");
        eprintln!("blkshim: {e}");
        std::process::exit(1);
    }
}
