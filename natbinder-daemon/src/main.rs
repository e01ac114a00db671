use std::process::ExitCode;

use clap::Parser;
use natbinder::cli::{
    show::{self, exit},
    Cli, Command,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Bad arguments exit with 2 (clap's usage error).
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon(args) => {
            natbinder::host::memory::use_one_malloc_arena();
            init_logging();
            // aya-log forwards the eBPF programs' messages through the `log` facade.
            let _ = tracing_log::LogTracer::init();
            let result = args.into_config().and_then(|config| {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from)?;
                runtime.block_on(natbinder::daemon::run(config, shutdown_signal()))
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("natbinder: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => natbinder::run::run(args),
        Command::GenerateDocs { man, completions } => match natbinder::cli::docs::generate(&man, &completions) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("natbinder: {e:#}");
                ExitCode::from(exit::FAILED)
            }
        },
        Command::CheckConfig { config } => {
            match natbinder::cli::check_config(config, &natbinder::config::ConfigLayout::system()) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("natbinder: the configuration is refused: {e:#}");
                    ExitCode::from(exit::FAILED)
                }
            }
        }
        Command::Doctor { json, socket, discovery_timeout } => doctor(json, socket, discovery_timeout),
        command => client(command),
    }
}

/// The log: to the journal with its fields when systemd connected stderr to it (JOURNAL_STREAM names
/// stderr's device and inode), else to stderr, coloured only on a terminal. NATBINDER_LOG filters.
fn init_logging() {
    use std::{io::IsTerminal, os::unix::fs::MetadataExt};
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_env("NATBINDER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr_is_journal = std::env::var("JOURNAL_STREAM").ok().is_some_and(|stream| {
        let stderr = std::fs::metadata("/proc/self/fd/2");
        stderr.is_ok_and(|m| stream == format!("{}:{}", m.dev(), m.ino()))
    });
    if stderr_is_journal {
        if let Ok(journal) = tracing_journald::layer() {
            use tracing_journald::{Priority, PriorityMappings};
            // syslog's levels, as journalctl -p expects them (the crate's default makes INFO a notice).
            let levels =
                PriorityMappings { info: Priority::Informational, debug: Priority::Debug, ..PriorityMappings::new() };
            let journal = journal
                .with_syslog_identifier("natbinder".into())
                .with_field_prefix(Some("NATBINDER".into()))
                .with_priority_mappings(levels);
            tracing_subscriber::registry().with(filter).with(journal).init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The commands that talk to a running daemon.
fn client(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("natbinder: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let result = runtime.block_on(async {
        match &command {
            Command::Status(output) => show::status(output).await.map(|()| true),
            Command::List { all, output } => show::list(output, *all).await.map(|()| true),
            Command::Get { protocol, port, output } => show::get(output, *protocol, *port).await.map(|()| true),
            Command::ExternalIp(output) => show::external_ip(output).await,
            Command::Watch(output) => show::watch(output).await.map(|()| true),
            Command::Reload(output) => show::reload(output).await.map(|()| true),
            Command::Add { target, description, output } => {
                show::change(output, "Add", target.protocol, target.port, description.as_deref()).await.map(|()| true)
            }
            Command::Delete { target, output } => {
                show::change(output, "Delete", target.protocol, target.port, None).await.map(|()| true)
            }
            Command::Enable { target, output } => {
                show::change(output, "Enable", target.protocol, target.port, None).await.map(|()| true)
            }
            Command::Disable { target, output } => {
                show::change(output, "Disable", target.protocol, target.port, None).await.map(|()| true)
            }
            Command::Describe { target, text, output } => {
                show::change(output, "Describe", target.protocol, target.port, Some(text)).await.map(|()| true)
            }
            Command::Daemon(_)
            | Command::Run(_)
            | Command::Doctor { .. }
            | Command::CheckConfig { .. }
            | Command::GenerateDocs { .. } => {
                unreachable!("handled in main")
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(exit::FAILED),
        Err(e) => {
            let (code, text) = show::failure(&e);
            eprintln!("natbinder: {text}");
            ExitCode::from(code)
        }
    }
}

/// `natbinder doctor`: exits 1 when something keeps natbinder from working.
fn doctor(json: bool, socket: std::path::PathBuf, discovery_timeout: u64) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("natbinder: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let options =
        natbinder::doctor::Options { socket, discovery_timeout: std::time::Duration::from_secs(discovery_timeout) };
    let checks = runtime.block_on(natbinder::doctor::examine(&options));
    if json {
        println!("{}", natbinder::doctor::to_json(&checks));
    } else {
        print!("{}", natbinder::doctor::to_text(&checks));
    }
    match natbinder::doctor::blocked(&checks) {
        true => ExitCode::from(exit::FAILED),
        false => ExitCode::SUCCESS,
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
