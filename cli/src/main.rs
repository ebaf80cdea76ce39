//! `outbox`: the operator's tool for the outbox extension. It connects like psql, prints
//! tables for people and JSON for scripts (`--json`), and exits with 0 (done), 1 (the
//! database refused or failed), 2 (bad usage), 3 (cannot connect) or 4 (not confirmed).

mod commands;
mod connect;
mod error;
mod exporter;
mod format;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::commands::Attach;
use crate::connect::Session;
use crate::error::{CliError, Result};

#[derive(Parser)]
#[command(name = "outbox", version, about = "Watch and operate the outbox: backlog, dead letters, replay, subscriptions, metrics")]
struct Cli {
    /// Connection string (key=value or postgres:// URL); without it, the PG* variables as for psql
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    dsn: Option<String>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per subscription: pending, in flight, retrying, dead, oldest pending age, latency, sink state
    Status {
        /// Refresh in place until interrupted
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch (at most a day)
        #[arg(long, default_value_t = 2.0, value_parser = watch_interval)]
        interval: f64,
    },
    /// Events that exhausted their attempts
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Deliver events of a subscription again
    Replay {
        #[arg(long)]
        subscription: String,
        /// Events captured since this time (a timestamp, or a duration ago such as 2h)
        #[arg(long, required_unless_present = "id")]
        since: Option<String>,
        /// Event ids (repeat the flag or separate with commas)
        #[arg(long, value_delimiter = ',')]
        id: Option<Vec<i64>>,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// List, add and remove subscriptions
    #[command(subcommand)]
    Subscriptions(Subscriptions),
    /// Capture changes of a table (again: change its settings)
    Attach {
        /// The table, schema-qualified if it is not on the search path
        table: String,
        /// Columns copied into each event's data (default: none)
        #[arg(long, value_delimiter = ',')]
        payload_columns: Option<Vec<String>>,
        /// Columns whose change makes an update an event (default: any column)
        #[arg(long, value_delimiter = ',')]
        watch_columns: Option<Vec<String>>,
        /// Event type prefix (default EMBED: EMBED_UPSERT, EMBED_DELETE, EMBED_TRUNCATE)
        #[arg(long)]
        event_prefix: Option<String>,
        /// Columns identifying a row (default: the primary key)
        #[arg(long, value_delimiter = ',')]
        key_columns: Option<Vec<String>>,
    },
    /// Stop capturing changes of a table
    Detach { table: String },
    /// Prometheus metrics
    #[command(subcommand)]
    Metrics(Metrics),
}

#[derive(Subcommand)]
enum DeadLetters {
    /// The most recent dead letters
    List {
        #[arg(long)]
        subscription: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One dead letter with its payload
    Show {
        id: i64,
        #[arg(long)]
        subscription: Option<String>,
    },
    /// Make dead letters deliverable again (all of them, or of a subscription, or by id)
    Requeue {
        #[arg(long)]
        subscription: Option<String>,
        #[arg(long, value_delimiter = ',')]
        id: Option<Vec<i64>>,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Delete dead letters that failed longer ago than a duration
    Purge {
        /// Such as 30d or 12h
        #[arg(long)]
        older_than: String,
        #[arg(long)]
        subscription: Option<String>,
        #[command(flatten)]
        confirm: Confirm,
    },
}

#[derive(Subcommand)]
enum Subscriptions {
    List,
    Add {
        name: String,
        /// pull, http or function
        #[arg(long, default_value = "pull")]
        sink: String,
        /// The sink's options as JSON, such as '{"url": "http://search:8080/v1/upsert"}'
        #[arg(long, default_value = "{}")]
        options: String,
        /// Also deliver every event still retained, not only those committed from now on
        #[arg(long)]
        from_start: bool,
    },
    /// Remove a subscription with its undelivered events and dead letters
    Remove {
        name: String,
        /// Do not ask, even when events are still undelivered
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum Metrics {
    /// Serve /metrics for Prometheus from outbox_metrics()
    Serve {
        #[arg(long, default_value = "127.0.0.1:9187")]
        listen: String,
    },
}

#[derive(Args)]
struct Confirm {
    /// Do not ask for confirmation
    #[arg(long)]
    yes: bool,
    /// Ask for confirmation when more events than this would be touched
    #[arg(long, default_value_t = 1000)]
    confirm_above: usize,
}

/// The longest refresh interval: longer is a typo, and too long for a sleep.
const MAX_WATCH_INTERVAL_SECONDS: f64 = 86_400.0;

fn watch_interval(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds <= MAX_WATCH_INTERVAL_SECONDS => Ok(seconds),
        _ => Err(format!("expected a positive number of seconds up to {MAX_WATCH_INTERVAL_SECONDS} (a day), got {text:?}")),
    }
}

/// clap's message without its usage block, on one line.
fn usage_error_line(rendered: &str) -> String {
    let message = rendered.split("\n\nUsage:").next().unwrap_or(rendered);
    let message = message.strip_prefix("error: ").unwrap_or(message);
    // (clap ends some errors with its own pointer to --help; this line ends with one)
    let message = message.trim_end().strip_suffix("For more information, try '--help'.").unwrap_or(message);
    let words: Vec<&str> = message.split_whitespace().collect();
    format!("{} (see --help)", words.join(" "))
}

fn run(cli: Cli) -> Result<()> {
    let config = connect::config(cli.dsn.as_deref(), |name| std::env::var(name).ok())?;
    if let Command::Metrics(Metrics::Serve { listen }) = &cli.command {
        return exporter::serve(config, listen);
    }
    let session = &mut Session::open(&config)?;
    let json = cli.json;
    match cli.command {
        Command::Status { watch, interval } => commands::status(session, &config, json, watch.then_some(interval)),
        Command::DeadLetters(DeadLetters::List { subscription, limit }) => {
            if limit < 1 {
                return Err(CliError::Usage(format!("--limit must be at least 1, got {limit}")));
            }
            commands::dead_letters_list(session, json, subscription.as_deref(), limit)
        }
        Command::DeadLetters(DeadLetters::Show { id, subscription }) => {
            commands::dead_letters_show(session, json, id, subscription.as_deref())
        }
        Command::DeadLetters(DeadLetters::Requeue { subscription, id, confirm }) => {
            commands::dead_letters_requeue(session, json, subscription.as_deref(), id, confirm.confirm_above, confirm.yes)
        }
        Command::DeadLetters(DeadLetters::Purge { older_than, subscription, confirm }) => {
            commands::dead_letters_purge(session, json, &older_than, subscription.as_deref(), confirm.confirm_above, confirm.yes)
        }
        Command::Replay { subscription, since, id, confirm } => {
            commands::replay(session, json, &subscription, since.as_deref(), id, confirm.confirm_above, confirm.yes)
        }
        Command::Subscriptions(Subscriptions::List) => commands::subscriptions_list(session, json),
        Command::Subscriptions(Subscriptions::Add { name, sink, options, from_start }) => {
            commands::subscriptions_add(session, json, &name, &sink, &options, from_start)
        }
        Command::Subscriptions(Subscriptions::Remove { name, yes }) => commands::subscriptions_remove(session, json, &name, yes),
        Command::Attach { table, payload_columns, watch_columns, event_prefix, key_columns } => commands::attach(
            session,
            json,
            Attach { table: &table, payload_columns, watch_columns, event_prefix, key_columns },
        ),
        Command::Detach { table } => commands::detach(session, json, &table),
        Command::Metrics(_) => unreachable!("served above"),
    }
}

fn main() -> ExitCode {
    // a bug must still read as one line, without a backtrace (CI sets RUST_BACKTRACE)
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned());
        eprintln!("outbox: internal error: {}", message.unwrap_or_default().replace('\n', " "));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("outbox: {}", usage_error_line(&error.to_string()));
            return CliError::Usage(String::new()).exit_code();
        }
    };
    match run(cli) {
        Ok(()) | Err(CliError::OutputClosed) => ExitCode::SUCCESS,
        Err(error) => {
            // database messages can quote text stored by others
            eprintln!("outbox: {}", format::printable(&error.to_string()));
            error.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_fit_on_one_line() {
        let error = Cli::try_parse_from(["outbox", "replay", "--subscription", "s"]).err().unwrap();
        assert_eq!(
            usage_error_line(&error.to_string()),
            "the following required arguments were not provided: --since <SINCE> (see --help)"
        );
        let error = Cli::try_parse_from(["outbox", "status", "--interval", "0"]).err().unwrap();
        let line = usage_error_line(&error.to_string());
        assert!(line.contains("expected a positive number of seconds") && !line.contains("For more information"), "{line}");
    }

    #[test]
    fn watch_intervals_are_at_most_a_day() {
        assert_eq!(watch_interval("86400"), Ok(86_400.0));
        assert_eq!(watch_interval("0.2"), Ok(0.2));
        for bad in ["1e30", "86401", "inf", "NaN", "0"] {
            let error = Cli::try_parse_from(["outbox", "status", "--watch", "--interval", bad]).err().unwrap();
            let line = usage_error_line(&error.to_string());
            assert!(line.contains("--interval") && line.contains("up to 86400 (a day)"), "{bad}: {line}");
        }
    }
}
