//! `orderline`: serve the API, projections and sagas, apply migrations, read, verify and move
//! the log, rebuild read models, or mint a token. The commands are in [`cli`].

mod cli;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use orderline::database::Interrupted;

/// Exit codes: 0 done (also when the reader of the output went away, as `| head` does),
/// 1 `verify` found the log or a read model not intact, 2 anything else failed (so `verify`
/// could not check), 130 interrupted.
#[tokio::main]
async fn main() -> ExitCode {
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn")),
        )
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<cli::NotIntact>() => ExitCode::from(1),
        Err(e) if e.is::<Interrupted>() => ExitCode::from(130),
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            #[expect(clippy::print_stderr, reason = "the error is what the user must read")]
            {
                eprintln!("Error: {e:?}");
            }
            ExitCode::from(2)
        }
    }
}

/// Whether `error` is stdout's reader having gone away: the command's output was cut short on
/// purpose (`| head`), which is no failure.
fn broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
