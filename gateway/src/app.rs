//! The running gateway: telemetry endpoint, spool, router, and the pipeline's inputs,
//! rebuilt live on reload.
//!
//! Entry point: [`run`]. It returns when `shutdown` resolves, after inputs stopped taking
//! messages, the router spooled whatever Kafka had not confirmed, and acknowledgements for
//! what is safe went out.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use gateway_config::{Config, Input, Pipeline};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::router::{self, RouterHandle};
#[cfg(feature = "mqtt")]
use crate::sources::mqtt;
#[cfg(feature = "serial")]
use crate::sources::serial;
use crate::sources::{Settled, SourceContext, SourceState};
use crate::spool::Spool;
use crate::stages::{Chain, InputStages};

/// The inputs of one pipeline generation, and the ticker of its stages' timers.
struct Inputs {
    state: watch::Sender<SourceState>,
    tasks: Vec<JoinHandle<()>>,
    ticker: Ticker,
    settled: Settled,
}

/// How long a shutdown waits for the inputs to hand over what they took in before it
/// stops the router anyway (an input waiting for room in a full spool with `block`:
/// its batch is then dropped, counted as `input_stopped`, and not acknowledged).
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Inputs {
    fn quiesce(&self) {
        let _ = self.state.send(SourceState::Quiesce);
    }

    /// Quiesces the inputs and waits (up to [`SETTLE_LIMIT`]) until each has handed the
    /// router what it had taken in: the events of a burst an input was in the middle of.
    async fn quiesce_and_settle(&self) {
        self.quiesce();
        if !self.settled.wait(self.tasks.len(), SETTLE_LIMIT).await {
            tracing::warn!(limit = ?SETTLE_LIMIT, "an input did not hand over what it had taken in (the router has no room?); going on without it");
        }
    }

    /// Stops the inputs, then lets the stages release what they hold (open windows) to
    /// the router, which must still be running (unless [`Ticker::finish`] ran before).
    async fn stop(mut self) {
        let _ = self.state.send(SourceState::Stop);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        self.ticker.finish().await;
    }
}

/// Runs the stages' timers ([`crate::stages::Stage::tick`]) about once a second, and a
/// last round that releases everything when told to finish.
struct Ticker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Set when the router took nothing for [`HAND_OVER_LIMIT`]: what the stages still
    /// hand over is counted as dropped instead.
    give_up: tokio::sync::watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// How long the last round of the stages' timers may wait for the router (a full spool
/// with `block`) before a reload or a shutdown goes on without it.
const HAND_OVER_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a tick round needs.
struct Timers {
    ctx: SourceContext,
    global: Arc<Chain>,
    inputs: Vec<Arc<InputStages>>,
}

impl Timers {
    /// One round (`flush`: release everything); what comes out goes to the router,
    /// acknowledged by nobody (its inputs' messages were acknowledged already). Once
    /// `give_up` is set, what is not handed over yet is counted as dropped (reason
    /// `stage_flush_timeout`): these events were counted as generated.
    async fn run(&self, flush: bool, give_up: &mut tokio::sync::watch::Receiver<bool>) {
        let now_ns = crate::stages::mono_ns();
        let mut out = Vec::new();
        for i in &self.inputs {
            i.tick(now_ns, flush, &mut out);
        }
        self.global.tick(now_ns, flush, &mut out);
        let none = crate::ack::Ack::none();
        let items: Vec<_> = out
            .into_iter()
            .filter_map(|o| crate::sources::outcome(&self.ctx, None, o, &none))
            .collect();
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let batch: Vec<_> = items.by_ref().take(crate::router::MAX_BATCH).collect();
            // Counted before the batch goes into the send, which giving up drops. Only
            // events: a dead letter's payload was counted as dropped when it was refused.
            let event_source = |i: &crate::router::Item| match &i.record {
                crate::event::Record::Event(_) => Some(i.record.source().to_string()),
                crate::event::Record::DeadLetter(_) => None,
            };
            let sources: Vec<String> = batch.iter().filter_map(event_source).collect();
            tokio::select! {
                sent = self.ctx.items.send(batch.into_iter().collect()) => {
                    if sent.is_err() {
                        return; // the router is gone
                    }
                }
                // (A ticker dropped without `finish` closes the channel: no give-up.)
                Ok(_) = give_up.wait_for(|g| *g) => {
                    let rest = sources
                        .into_iter()
                        .chain(items.filter_map(|i| event_source(&i)));
                    for source in rest {
                        self.ctx.metrics.dropped(&source, "stage_flush_timeout", 1);
                    }
                    return;
                }
            }
        }
    }
}

impl Ticker {
    fn start(timers: Timers) -> Ticker {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (give_up, mut given_up) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => timers.run(false, &mut given_up).await,
                    _ = &mut stopped => break,
                }
            }
            timers.run(true, &mut given_up).await;
        });
        Ticker {
            stop: Some(stop),
            give_up,
            task: Some(task),
        }
    }

    /// Runs the last round (everything held goes to the router) and ends the ticker. A
    /// router that takes nothing for [`HAND_OVER_LIMIT`] (a full spool with `block`)
    /// does not hold the reload or the shutdown: what was left is counted as dropped.
    async fn finish(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(HAND_OVER_LIMIT, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(
                    "stages could not hand over what they held (open windows) within {HAND_OVER_LIMIT:?}; dropped (reason stage_flush_timeout)"
                );
                let _ = self.give_up.send(true);
                if tokio::time::timeout(std::time::Duration::from_secs(1), &mut task)
                    .await
                    .is_err()
                {
                    task.abort();
                }
            }
        }
    }
}

/// A pipeline's inputs and stages, checked and built, not yet running.
struct Prepared {
    inputs: Vec<(Input, Arc<InputStages>)>,
    global: Arc<Chain>,
    ctx: SourceContext,
}

/// Builds the stages and checks every input (secrets, certificates) so that a bad
/// pipeline is refused before anything running is touched.
fn prepare(
    p: &Pipeline,
    gateway_id: &str,
    router: &RouterHandle,
    metrics: &Metrics,
) -> Result<Prepared, String> {
    let global = Arc::new(Chain::build(&p.stages, Some(metrics), "")?);
    let inputs = p
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            check_input(i, input, gateway_id, true)?;
            let local = match input.stages() {
                [] => None,
                stages => Some(
                    Chain::build(stages, Some(metrics), input.name())
                        .map_err(|e| format!("inputs[{i}] ({}): {e}", input.name()))?,
                ),
            };
            let stages = Arc::new(InputStages {
                local,
                global: global.clone(),
            });
            Ok((input.clone(), stages))
        })
        .collect::<Result<_, String>>()?;
    let ctx = SourceContext {
        gateway_id: gateway_id.to_string(),
        stages: Arc::new(InputStages {
            local: None,
            global: global.clone(),
        }),
        items: router.items(),
        metrics: metrics.clone(),
        dead_letters: p.output.kafka.dead_letter_topic.is_some(),
        settled: Settled::default(),
    };
    Ok(Prepared {
        inputs,
        global,
        ctx,
    })
}

impl Prepared {
    fn start(self) -> Inputs {
        let (state, rx) = watch::channel(SourceState::Run);
        let settled = self.ctx.settled.clone();
        let ticker = Ticker::start(Timers {
            ctx: self.ctx.clone(),
            global: self.global.clone(),
            inputs: self.inputs.iter().map(|(_, s)| s.clone()).collect(),
        });
        let tasks = self
            .inputs
            .into_iter()
            .map(|(input, stages)| {
                let mut ctx = self.ctx.clone();
                ctx.stages = stages;
                let rx = rx.clone();
                tokio::spawn(async move {
                    let name = input.name().to_string();
                    if let Err(e) = run_input(input, ctx, rx).await {
                        tracing::error!(input = %name, error = %e, "input stopped");
                    }
                })
            })
            .collect();
        Inputs {
            state,
            tasks,
            ticker,
            settled,
        }
    }
}

/// Whether a stage of `p` reads a file (geofence zones, a lookup table).
fn reads_files(p: &Pipeline) -> bool {
    use gateway_config::Stage;
    p.stages
        .iter()
        .chain(p.inputs.iter().flat_map(|i| i.stages()))
        .any(|s| match s {
            Stage::Geofence(g) => g.file.is_some(),
            Stage::Enrich(e) => e.table.is_some(),
            _ => false,
        })
}

/// Builds every stage of `p` (compiling expressions, loading tables and zones) and runs
/// nothing: `check-config` uses it so a config that would fail at start fails there.
pub fn check_stages(p: &Pipeline) -> Result<(), String> {
    Chain::build(&p.stages, None, "")?;
    for (i, input) in p.inputs.iter().enumerate() {
        if !input.stages().is_empty() {
            Chain::build(input.stages(), None, input.name())
                .map_err(|e| format!("inputs[{i}] ({}): {e}", input.name()))?;
        }
    }
    Ok(())
}

/// Checks what can be checked of a pipeline before it runs: its stages build (their
/// files are there and valid), this build has its inputs, and (`secrets`) its inputs'
/// and output's secrets and certificates are readable, which they may be only where the
/// service runs (systemd credentials).
pub fn check_pipeline(p: &Pipeline, gateway_id: &str, secrets: bool) -> Result<(), String> {
    check_stages(p)?;
    if secrets {
        crate::sinks::kafka::check(&p.output.kafka, gateway_id)?;
    }
    for (i, input) in p.inputs.iter().enumerate() {
        check_input(i, input, gateway_id, secrets)?;
    }
    Ok(())
}

/// Checks that this build carries the input's type, and what can be checked of it
/// before it runs (secrets, certificates).
fn check_input(i: usize, input: &Input, gateway_id: &str, secrets: bool) -> Result<(), String> {
    #[cfg_attr(all(feature = "mqtt", feature = "serial"), allow(unused_variables))]
    let missing = |feature: &str| {
        format!(
            "inputs[{i}] ({}): this build has no {feature} input (cargo feature `{feature}`)",
            input.name()
        )
    };
    match input {
        #[cfg(feature = "mqtt")]
        Input::Mqtt(m) if secrets => mqtt::check(m, gateway_id),
        #[cfg(feature = "mqtt")]
        Input::Mqtt(_) => Ok(()),
        #[cfg(not(feature = "mqtt"))]
        Input::Mqtt(_) => {
            let _ = (gateway_id, secrets);
            Err(missing("mqtt"))
        }
        #[cfg(feature = "serial")]
        Input::Serial(_) => Ok(()),
        #[cfg(not(feature = "serial"))]
        Input::Serial(_) => Err(missing("serial")),
    }
}

/// Runs one input task; [`check_input`] let only compiled-in types through.
async fn run_input(
    input: Input,
    ctx: SourceContext,
    rx: watch::Receiver<SourceState>,
) -> Result<(), String> {
    match input {
        #[cfg(feature = "mqtt")]
        Input::Mqtt(m) => mqtt::run(m, ctx, rx).await,
        #[cfg(feature = "serial")]
        Input::Serial(s) => serial::run(s, ctx, rx).await,
        #[allow(unreachable_patterns)]
        other => {
            let _ = (ctx, rx);
            Err(format!("input {}: not in this build", other.name()))
        }
    }
}

/// A request to replace the pipeline with `config`'s; `done` hears how it went.
pub struct Reload {
    /// The new configuration (only its pipeline is applied).
    pub config: Config,
    /// The local file's config (a SIGHUP): the remotely applied pipeline, if any, is
    /// looked up when the reload is carried out, not when it was asked for, so that a
    /// remote apply or rollback queued in between is not undone by it.
    pub local_file: bool,
    /// Told the outcome, when the requester waits for it (remote configuration).
    pub done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// How long the gateway waits before it tries again to open a spool it could not open
/// for a reason that may pass (a full disk).
const SPOOL_OPEN_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Where reload requests come from (SIGHUP, remote configuration).
pub type ReloadRequests = mpsc::Receiver<Reload>;

/// Runs the gateway until `shutdown` resolves. New configs arriving on `reloads` replace
/// the pipeline live.
pub async fn run(
    config: Config,
    metrics: Metrics,
    mut reloads: ReloadRequests,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if let Some(addr) = &config.telemetry.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on telemetry.listen = {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, "serving /metrics and /health");
        tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
    }
    let path = config.spool_path();
    tokio::pin!(shutdown);
    // A spool that cannot be opened for a reason that may pass (a full disk) is tried
    // again here: exiting would make the service manager restart the gateway in a loop,
    // and nothing would ever drain the backlog that fills the disk. Inputs wait; /health
    // says down meanwhile.
    let mut report = crate::spool::OpenReport::default();
    let spool = loop {
        match Spool::open_reporting(&path, config.spool.synchronous, &mut report) {
            Ok(opened) => break opened,
            Err(e) if e.may_pass() => {
                metrics.spool_error(if matches!(e, crate::spool::SpoolError::DiskFull(_)) {
                    "disk_full"
                } else {
                    "io"
                });
                // The reserve is there for this: given up, it may be the room the open
                // needs (a run that filled the disk and stopped), at once.
                let mut reserve = crate::spool::Reserve::new(&path, config.spool.reserve_bytes);
                let full = matches!(e, crate::spool::SpoolError::DiskFull(_));
                if reserve.held() && (full || reserve.short_of_room()) && reserve.release().is_ok()
                {
                    tracing::warn!(spool = %path.display(), error = %e, reserve = %reserve.path().display(),
                        "cannot open the spool (is the disk full?); gave up its reserve and trying again");
                    continue;
                }
                tracing::error!(spool = %path.display(), error = %e, retry_in = ?SPOOL_OPEN_RETRY,
                    "cannot open the spool (is the disk full?); inputs wait until it opens");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(SPOOL_OPEN_RETRY) => {}
                }
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot open the spool at {}", path.display()))
            }
        }
    };
    if report.quarantined.is_some() {
        metrics.spool_quarantined();
    }
    tracing::info!(spool = %path.display(), rows = spool.rows(), bytes = spool.bytes(), "spool open");
    let router = router::start(
        spool,
        config.spool.clone(),
        &config.output.kafka,
        &config.gateway.id,
        metrics.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let mut current = config;
    let mut inputs = match prepare(&current.pipeline(), &current.gateway.id, &router, &metrics) {
        Ok(prepared) => prepared.start(),
        Err(e) => {
            // The router took over the spool: it commits and stops before the exit.
            tokio::task::block_in_place(|| router.shutdown());
            return Err(anyhow::Error::msg(e));
        }
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(Reload { config: next, local_file, done }) = reloads.recv() => {
                if next.gateway != current.gateway || next.spool != current.spool || next.telemetry != current.telemetry || next.control != current.control {
                    tracing::warn!("[gateway], [spool], [telemetry] and [control] changes take effect on restart; applying the pipeline only");
                }
                let next = if local_file {
                    // The file's pipeline under the running bootstrap: the remote state
                    // is looked up where it is (a [control] taken out of the file, or a
                    // state_dir changed, takes effect on restart, like the rest).
                    let file = Config {
                        gateway: current.gateway.clone(),
                        spool: current.spool.clone(),
                        telemetry: current.telemetry.clone(),
                        control: current.control.clone(),
                        ..next
                    };
                    crate::remote::effective(file, false).0
                } else {
                    next
                };
                let result: Result<(), String> = 'apply: {
                    let pipeline = next.pipeline();
                    // Zones and lookup tables are read when stages are built: a reload
                    // rebuilds them even if only those files changed.
                    if pipeline == current.pipeline() && !reads_files(&pipeline) {
                        tracing::info!("configuration unchanged");
                        break 'apply Ok(());
                    }
                    // Build and check the new pipeline first: a bad one leaves the running
                    // one alone.
                    let prepared = match prepare(&pipeline, &current.gateway.id, &router, &metrics) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::error!(error = %e, "new configuration rejected; keeping the running one");
                            break 'apply Err(e);
                        }
                    };
                    // The output first: if the new one is refused, the running pipeline
                    // stays whole (never new inputs on the old output).
                    if pipeline.output != current.output {
                        let out = pipeline.output.kafka.clone();
                        if let Err(e) = tokio::task::block_in_place(|| router.reconfigure(out)) {
                            tracing::error!(error = %e, "new Kafka output rejected; keeping the running pipeline");
                            break 'apply Err(format!("the Kafka output: {e}"));
                        }
                        current.output = pipeline.output;
                    }
                    inputs.quiesce();
                    inputs.stop().await;
                    inputs = prepared.start();
                    current.inputs = pipeline.inputs;
                    current.stages = pipeline.stages;
                    tracing::info!("pipeline reloaded");
                    Ok(())
                };
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        }
    }
    tracing::info!("shutting down: stopping inputs, spooling what Kafka has not confirmed");
    inputs.quiesce_and_settle().await;
    // Open windows and the like go to the router before it spools and stops.
    inputs.ticker.finish().await;
    tokio::task::block_in_place(|| router.shutdown());
    inputs.stop().await;
    Ok(())
}

/// Forwards SIGHUP as a reload of `path` on `tx`; a config that does not validate is
/// logged and ignored. A pipeline applied by remote configuration (even one in its health
/// window) stays: the file's pipeline is only the fallback when none was applied.
pub fn reload_on_sighup(path: PathBuf, tx: mpsc::Sender<Reload>) -> anyhow::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match gateway_config::load(&path) {
                Ok(c) => {
                    tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
                    let reload = Reload {
                        config: c,
                        local_file: true,
                        done: None,
                    };
                    if tx.send(reload).await.is_err() {
                        break;
                    }
                }
                Err(e) => tracing::error!(
                    "SIGHUP: the configuration does not validate, keeping the running one:\n{e}"
                ),
            }
        }
    });
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (in a
/// runtime), not when the future is first polled: a signal that comes while the spool is
/// opened and checked at start is then a graceful shutdown too, not the default kill.
pub fn termination() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(term) => {}
            _ = wait(int) => {}
        }
    }
}
