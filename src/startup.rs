//! Building and running the service: the HTTP server and, with `RUN_WORKERS=true`, the
//! in-process workers, all stopped by one cancellation token.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::qstash::Verifier;
use crate::config::{Config, SyncQueue};
use crate::db::warm::WarmConnections;
use crate::error::error_chain;
use crate::poller::{InFlight, Poller};
use crate::publish::direct::DirectPublisher;
use crate::publish::qstash::QstashPublisher;
use crate::publish::Publisher;
use crate::routes::{self, AppState};
use crate::sequencer::ClaimFor;
use crate::sync::policy::{PrivateTargets, TargetPolicy};
use crate::sync::SyncEngine;
use crate::wakeup::{self, SequencerLoop, Wakeups};
use crate::{db, instruments, workers};
use futures::FutureExt;

/// A bound, not yet running service. Binding first lets tests ask for port 0 and learn
/// the real port before serving.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    /// `RUN_WORKERS`: the sequencer and poller loops run in this process.
    run_workers: bool,
}

impl Application {
    /// Binds `config.bind_addr`. The database must already be migrated.
    pub async fn build(
        config: Config,
        pool: PgPool,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.bind_addr)
            .await
            .with_context(|| format!("cannot listen on BIND_ADDR {}", config.bind_addr))?;
        // Installed before any work is done, so that every count reaches /metrics.
        instruments::handle();
        let private_targets = if config.allow_private_targets {
            PrivateTargets::Allowed
        } else {
            PrivateTargets::Refused
        };
        let engine = Arc::new(SyncEngine::new(
            pool.clone(),
            config.sync.clone(),
            TargetPolicy::new(private_targets, config.database.location()),
        ));
        let publisher: Arc<dyn Publisher> = match (config.sync_queue, &config.qstash.token) {
            (SyncQueue::Qstash, Some(token)) => Arc::new(QstashPublisher::new(
                &config.qstash.url,
                token.clone(),
                &config.public_url,
                config.qstash.retries,
            )),
            // Configuration parsing refuses qstash without a token.
            _ => Arc::new(DirectPublisher::new(engine.clone())),
        };
        let poller = Arc::new(
            Poller::new(pool.clone(), publisher, config.poller.clone())
                .stopping_on(shutdown.clone()),
        );
        let sync_engine_url = format!(
            "{}{}",
            config.public_url.as_str().trim_end_matches('/'),
            db::queue::SYNC_ENGINE_PATH
        );
        let verifier = Verifier::new(
            config.qstash.current_signing_key.as_ref(),
            config.qstash.next_signing_key.as_ref(),
            &sync_engine_url,
            config.qstash.clock_tolerance,
        );
        Ok(Self {
            listener,
            run_workers: config.run_workers,
            state: AppState {
                pool,
                cron_secret: Arc::new(config.cron_secret),
                sequencer: config.sequencer,
                engine,
                poller,
                verifier: verifier.map(Arc::new),
                shutdown,
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// Serves until the shutdown token is cancelled, then waits for in-flight requests
    /// and workers to finish. If any task ends on its own, the others are stopped too
    /// and the error names the task.
    pub async fn run(self) -> anyhow::Result<()> {
        let Application {
            listener,
            state,
            run_workers,
        } = self;
        let shutdown = state.shutdown.clone();
        let mut tasks = JoinSet::new();

        let router = routes::router(state.clone());
        let http_shutdown = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(http_shutdown.cancelled_owned())
                .await;
            ("http server", served.map_err(anyhow::Error::from))
        });
        tasks.spawn(keep_metrics_bounded(shutdown.clone()));
        if run_workers {
            let wakeups = Wakeups::default();
            tasks.spawn(
                wakeup::listen(state.pool.clone(), wakeups.clone(), shutdown.clone())
                    .map(|()| ("change listener", Ok(()))),
            );
            // The poller loop's publishes, which the sequencer's batches start too when
            // they claim what they queue; they wake the poller loop when they end and
            // it may find more work, as new requests do.
            let in_flight = Arc::new(InFlight::for_loop(wakeups.requests.clone()));
            let sequencer_stopped = CancellationToken::new();
            tasks.spawn(run_sequencer(
                state.clone(),
                wakeups.changes.clone(),
                in_flight.clone(),
                sequencer_stopped.clone(),
            ));
            tasks.spawn(run_poller(
                state.clone(),
                wakeups.requests.clone(),
                in_flight,
                sequencer_stopped,
            ));
        }
        join_all(tasks, &shutdown).await
    }
}

/// Drains the histograms every few seconds, so that they stay bounded between scrapes.
async fn keep_metrics_bounded(shutdown: CancellationToken) -> Ended {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return ("metrics upkeep", Ok(())),
            _ = ticks.tick() => instruments::run_upkeep(),
        }
    }
}

/// A task of the service: its name, and how it ended.
type Ended = (&'static str, anyhow::Result<()>);

/// The sequencer's loop, until shutdown; then it gives its lease up. Its batches claim
/// what they queue for the process's poller, whose publishes start in `in_flight`;
/// `stopped` is cancelled once the loop ran its last batch (the poller then finishes).
async fn run_sequencer(
    state: AppState,
    wake: Arc<Notify>,
    in_flight: Arc<InFlight>,
    stopped: CancellationToken,
) -> Ended {
    let stopped = stopped.drop_guard();
    let settings = &state.sequencer;
    let sequencer = tokio::sync::Mutex::new(SequencerLoop::default());
    let sequencer = &sequencer;
    let connections = &WarmConnections::new(state.pool.clone());
    let claim_for = ClaimFor {
        poller: &state.poller,
        in_flight: &in_flight,
    };
    let claim_for = &claim_for;
    let dropped = workers::run_loop(
        "sequencer",
        state.shutdown.clone(),
        settings.idle_interval,
        wake,
        || async {
            let mut sequencer = sequencer.lock().await;
            sequencer.step(connections, settings, Some(claim_for)).await
        },
    )
    .await;
    drop(stopped);
    if dropped.0 {
        tracing::warn!("the database does not answer; the sequencer's lease runs out on its own");
    } else {
        sequencer
            .lock()
            .await
            .give_up_lease(connections, settings)
            .await;
    }
    ("sequencer worker", Ok(()))
}

/// The poller's loop, until shutdown; then it settles the syncs it and the sequencer's
/// batches started (once `sequencer_stopped`: no batch starts one after that).
async fn run_poller(
    state: AppState,
    wake: Arc<Notify>,
    in_flight: Arc<InFlight>,
    sequencer_stopped: CancellationToken,
) -> Ended {
    let poller = &state.poller;
    let settings = poller.settings();
    let in_flight = &*in_flight;
    let _ = workers::run_loop(
        "poller",
        state.shutdown.clone(),
        settings.idle_interval,
        wake,
        || poller.loop_step(in_flight),
    )
    .await;
    sequencer_stopped.cancelled().await;
    // Syncs already started are finished and settled before the process ends, rather
    // than left claimed until their lease runs out.
    if let Err(error) = poller.finish(in_flight).await {
        tracing::warn!(error = %error_chain(&error), "cannot settle the last sync requests; their leases will expire");
    }
    ("poller worker", Ok(()))
}

/// Waits for every task. The first one that fails, or ends before shutdown, stops the
/// others, and its error is returned.
async fn join_all(mut tasks: JoinSet<Ended>, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut first_failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (task, result) = match joined {
            Ok(ended) => ended,
            Err(join_error) => ("a task", Err(anyhow::anyhow!("panicked: {join_error}"))),
        };
        let unexpected = !shutdown.is_cancelled();
        match (&result, unexpected) {
            (Ok(()), false) => tracing::info!(task, "stopped"),
            (Ok(()), true) => tracing::error!(task, "ended unexpectedly; stopping the service"),
            (Err(error), _) => {
                tracing::error!(task, error = %format!("{error:#}"), "failed; stopping the service")
            }
        }
        if unexpected || result.is_err() {
            shutdown.cancel();
            if first_failure.is_none() {
                first_failure = Some(match result {
                    Ok(()) => anyhow::anyhow!("{task} ended unexpectedly"),
                    Err(error) => error.context(format!("{task} failed")),
                });
            }
        }
    }
    first_failure.map_or(Ok(()), Err)
}

/// `serve`: connect, migrate, listen, and run until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let pool = db::connect(&config.database)
        .await
        .context("cannot connect to the internal database (DATABASE_URL)")?;
    db::migrate(&pool)
        .await
        .context("cannot migrate the internal database")?;
    let shutdown = CancellationToken::new();
    let application = Application::build(config, pool.clone(), shutdown.clone()).await?;
    tracing::info!(address = %application.local_addr(), "listening");
    tokio::spawn(cancel_on_signal(shutdown));
    application.run().await?;
    pool.close().await;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Cancels `shutdown` on the first SIGINT (Ctrl-C) or SIGTERM (what orchestrators send).
pub(crate) async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
    shutdown.cancel();
}
