//! The `gateway` command line: run the gateway, check and print configs, inspect the
//! spool, and run the self-contained demo. `main.rs` only calls [`main`], so test
//! packages can build the very same command as their own binary.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::metrics::Metrics;
use crate::spool::Spool;
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gateway_config::{Config, LogFormat};

/// Edge IoT stream gateway: MQTT in, local stages, SQLite spool, batches to Kafka.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (SIGHUP reloads the pipeline, SIGTERM/SIGINT stop it cleanly).
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and report every problem.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
        /// Also read the secrets, certificates and keys it names (run it as the service
        /// user where the service runs: systemd credentials exist only there).
        #[arg(long)]
        secrets: bool,
    },
    /// Print a commented default configuration.
    PrintConfig,
    /// Inspect the spool (works while the gateway runs).
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
        /// The configuration file (to find the spool).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// The spool file itself, instead of --config.
        #[arg(long, global = true)]
        path: Option<PathBuf>,
    },
    /// Remote configuration, the operator's side: keys, signed envelopes, pushing them,
    /// a fleet's status.
    #[cfg(feature = "operator")]
    Remote {
        #[command(subcommand)]
        command: crate::operator::RemoteCommand,
    },
    /// Run a self-contained demo: in-process MQTT broker and Kafka mock, a simulated
    /// fleet, an uplink outage midway, and a reconciliation table at the end.
    #[cfg(feature = "demo")]
    Demo(crate::demo::DemoArgs),
    /// Simulate a device, for tests and trying a config without hardware.
    #[cfg(feature = "serial")]
    Simulate {
        #[command(subcommand)]
        what: SimulateCommand,
    },
}

#[cfg(feature = "serial")]
#[derive(Subcommand)]
enum SimulateCommand {
    /// A serial device on a pseudo-terminal behind a symlink; prints a JSON report at the
    /// end (readings taken and acknowledged per boot).
    Serial(crate::simulate::SerialSim),
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Rows, bytes, per-input counts, schema version.
    Stats,
    /// Full integrity check and a decode of every row (the running gateway's WAL grows
    /// while it reads: see the README).
    Check,
    /// Write every spooled event as a JSON line to stdout.
    Export {
        /// The quarantine table instead: records Kafka refused for good and rows that
        /// could not be decoded, each with its `reason`.
        #[arg(long)]
        quarantined: bool,
    },
}

fn init_logs(format: LogFormat, level: &str) {
    use tracing_subscriber::{filter::Targets, fmt, prelude::*};
    // `Targets` takes the same `info,librdkafka=warn` directives as RUST_LOG usually does,
    // without EnvFilter's regex engine (about half a MiB of device binary).
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let parse = |spec: &str| match gateway_config::tidy_log_filter(spec).parse::<Targets>() {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("warning: ignoring the log filter {spec:?}: {e}");
            None
        }
    };
    let filter = from_env
        .as_deref()
        .and_then(parse)
        .or_else(|| parse(level))
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let layer = fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Human => tracing_subscriber::registry()
            .with(layer)
            .with(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json())
            .with(filter)
            .init(),
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    gateway_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn spool_path(config: Option<PathBuf>, path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match (path, config) {
        (Some(p), _) => Ok(p),
        (None, Some(c)) => Ok(load(&c)?.spool_path()),
        (None, None) => anyhow::bail!("give --config FILE or --path SPOOL"),
    }
}

/// Parses the command line and runs the command; the exit code says how it went.
pub fn main() -> ExitCode {
    crate::tune_allocator();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config: path } => {
            let config = load(&path)?;
            init_logs(config.telemetry.log_format, &config.telemetry.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_stack_size(crate::stages::expr::EVAL_STACK)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async {
                let (tx, reloads) = tokio::sync::mpsc::channel(4);
                crate::app::reload_on_sighup(path.clone(), tx.clone())?;
                tracing::info!(config = %path.display(), id = %config.gateway.id, version = env!("CARGO_PKG_VERSION"), "gateway starting");
                let metrics = Metrics::new();
                // A pipeline applied remotely before a restart runs again.
                let local = config;
                let (config, fallback) = crate::remote::effective(local.clone(), true);
                if let Some(control) = local.control.clone() {
                    crate::remote::start(control, local, path.clone(), fallback, metrics.clone(), tx);
                }
                crate::app::run(config, metrics, reloads, crate::app::termination()).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file, secrets } => match gateway_config::load(&file)
            .map_err(|e| e.to_string())
            .and_then(
                |c| match crate::app::check_pipeline(&c.pipeline(), &c.gateway.id, secrets) {
                    Ok(()) => Ok(c),
                    Err(e) => Err(format!("{}: {e}", file.display())),
                },
            ) {
            Ok(c) => {
                println!(
                    "{}: ok ({} input(s), {} stage(s), Kafka at {})",
                    file.display(),
                    c.inputs.len(),
                    c.stages.len(),
                    c.output.kafka.brokers
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(2))
            }
        },
        #[cfg(feature = "operator")]
        Command::Remote { command } => {
            crate::operator::run(command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::PrintConfig => {
            print!("{}", gateway_config::DEFAULT_CONFIG);
            Ok(ExitCode::SUCCESS)
        }
        Command::Spool {
            command,
            config,
            path,
        } => {
            let path = spool_path(config, path)?;
            if !path.exists() {
                anyhow::bail!("no spool at {}", path.display());
            }
            // Read-only: safe beside a running gateway, and never moves a file aside.
            let mut spool = Spool::open_read_only(&path)
                .with_context(|| format!("cannot open the spool at {}", path.display()))?;
            match command {
                SpoolCommand::Stats => {
                    let s = spool.stats()?;
                    println!("spool:          {}", path.display());
                    println!("schema version: {}", s.schema_version);
                    println!("rows:           {}", s.rows);
                    println!("data bytes:     {}", s.bytes);
                    println!("file bytes:     {}", s.file_bytes);
                    if let Some((a, b)) = s.seq_range {
                        println!("seq range:      {a}..={b}");
                    }
                    println!("quarantined:    {}", s.quarantined_rows);
                    for (source, n) in s.per_source {
                        println!("  input {source}: {n} rows");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                SpoolCommand::Check => {
                    let problems = spool.check()?;
                    if problems.is_empty() {
                        println!("{}: ok ({} rows)", path.display(), spool.rows());
                        Ok(ExitCode::SUCCESS)
                    } else {
                        for p in &problems {
                            println!("{p}");
                        }
                        Ok(ExitCode::from(1))
                    }
                }
                SpoolCommand::Export { quarantined } => {
                    let stdout = std::io::stdout();
                    let mut out = std::io::BufWriter::new(stdout.lock());
                    let n = if quarantined {
                        spool.export_quarantined(&mut out)?
                    } else {
                        spool.export(&mut out)?
                    };
                    // Not left to the drop, which ignores a failed last write (a full
                    // disk behind a redirect).
                    std::io::Write::flush(&mut out).context("writing the export")?;
                    drop(out);
                    eprintln!("exported {n} rows");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            init_logs(LogFormat::Human, "error,rumqttd=off");
            crate::demo::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "serial")]
        Command::Simulate {
            what: SimulateCommand::Serial(sim),
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let report = rt.block_on(async {
                crate::simulate::serial(sim, crate::app::termination()).await
            })?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
