//! `qsysd`: parses arguments, loads the config and hands over to [`qsys::daemon`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qsys::config::{self, Config};

/// Task-queue daemon: Redis queues to GPU slots and handlers, state in MySQL.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Validate the configuration, print a summary and exit (0 valid, 2 invalid).
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config, &config::process_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qsysd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        print!("{}", config.summary());
        println!("config ok: {}", args.config.display());
        return ExitCode::SUCCESS;
    }
    qsys::logging::init(config.daemon.log_target, config.daemon.log_level);
    match run(config, args.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let mut daemon = qsys::daemon::Daemon::start(config)?;
    daemon.reload_from(path);
    qsys::daemon::spawn_signal_thread(daemon.stopper())?;
    daemon.wait()?;
    Ok(())
}
