//! `idem`: the operator's command for idempotency's stores.
//!
//! ```text
//! idem --store URL get --scope S --key K [--name NAME] [--json]
//! idem --store URL forget --key K [--name NAME] [--force]
//! idem --store URL in-flight [--older-than 5m] [--json]
//! idem --store URL purge [--json]
//! idem --store URL stats [--json]
//! ```
//!
//! Exit codes: 0 done, 1 no such record, 2 bad usage / bad URL / unreachable store, 3 a store
//! error during the command, 4 `forget` of an in-flight record refused without `--force`.

mod args;
mod commands;
mod failure;
mod open;
mod output;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};
use failure::{Exit, Failure, Outcome};
use open::Location;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("idem: cannot start the async runtime: {e}");
            return ExitCode::from(Exit::Store as u8);
        }
    };
    let result = runtime.block_on(run(&cli));
    // A store's background tasks (a pool, a subscriber) must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(text) => {
            // A closed pipe (`idem in-flight | head`) is not an error of the command.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("idem: {failure}");
            failure.code()
        }
    }
}

/// Opens the store and runs the subcommand; returns what to print.
async fn run(cli: &Cli) -> Outcome<String> {
    let Some(url) = cli.store.as_deref() else {
        return Err(Failure::new(
            Exit::Usage,
            "no store: give --store URL (or set IDEM_STORE)",
        ));
    };
    let location = Location {
        url,
        table: cli.table.as_deref(),
        prefix: cli.prefix.as_deref(),
    };
    let store = open::open(&location).await?;
    let store = &*store;
    match &cli.command {
        Command::Get { record, json } => commands::get(store, record, *json).await,
        Command::Forget { record, force } => commands::forget(store, record, *force).await,
        Command::InFlight { older_than, json } => {
            commands::in_flight(store, *older_than, *json).await
        }
        Command::Purge { json } => commands::purge(store, *json).await,
        Command::Stats { json } => commands::stats(store, *json).await,
    }
}
