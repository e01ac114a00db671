use std::process::ExitCode;

use clap::Parser;
use natbinder::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("NATBINDER_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_target(false)
        .init();
    // aya-log forwards the eBPF programs' messages through the `log` facade.
    let _ = tracing_log::LogTracer::init();

    let result = match cli.command {
        Command::Daemon(args) => args.into_config().and_then(|config| {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from)?;
            runtime.block_on(natbinder::daemon::run(config, shutdown_signal()))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natbinder: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
