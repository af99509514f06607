//! Building and running the service: the HTTP server and, with `RUN_WORKERS=true`, the
//! in-process workers, all stopped by one cancellation token.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::qstash::Verifier;
use crate::config::{Config, SyncQueue};
use crate::error::error_chain;
use crate::poller::{InFlight, Poller};
use crate::queue::direct::DirectPublisher;
use crate::queue::qstash::QstashPublisher;
use crate::queue::Publisher;
use crate::sync::target::TargetPolicy;
use crate::sync::SyncEngine;
use crate::wakeup::{self, Wakeups};
use crate::{db, routes, sequencer, workers};
use futures::FutureExt;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub engine: Arc<SyncEngine>,
    /// Claims sync requests and publishes them where `SYNC_QUEUE` says.
    pub poller: Arc<Poller>,
    /// Checks `/sync-engine` signatures; `None` when no signing key is configured.
    pub verifier: Option<Arc<Verifier>>,
    /// Cancelled when the service shuts down; long-running handlers stop early on it.
    pub shutdown: CancellationToken,
}

/// A bound, not yet running service. Binding first lets tests ask for port 0 and learn
/// the real port before serving.
pub struct Application {
    listener: TcpListener,
    state: AppState,
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
        let engine = Arc::new(SyncEngine::new(
            pool.clone(),
            config.sync.clone(),
            TargetPolicy::new(config.allow_private_targets, config.database.location()),
        ));
        let publisher = match (config.sync_queue, &config.qstash.token) {
            (SyncQueue::Qstash, Some(token)) => Publisher::Qstash(QstashPublisher::new(
                &config.qstash.url,
                token.clone(),
                &config.public_url,
                config.qstash.retries,
            )),
            // Configuration parsing refuses qstash without a token.
            _ => Publisher::Direct(DirectPublisher::new(engine.clone())),
        };
        let poller = Arc::new(Poller::new(
            pool.clone(),
            Arc::new(publisher),
            config.poller.clone(),
        ));
        let sync_engine_url = format!(
            "{}{}",
            config.public_url.as_str().trim_end_matches('/'),
            routes::SYNC_ENGINE_PATH
        );
        let verifier = Verifier::new(
            config.qstash.current_signing_key.as_ref(),
            config.qstash.next_signing_key.as_ref(),
            &sync_engine_url,
            config.qstash.clock_tolerance,
        );
        Ok(Self {
            listener,
            state: AppState {
                pool,
                config: Arc::new(config),
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
        let Application { listener, state } = self;
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

        if state.config.run_workers {
            let wakeups = Wakeups::default();
            tasks.spawn(
                wakeup::listen(state.pool.clone(), wakeups.clone(), shutdown.clone())
                    .map(|()| ("change listener", Ok(()))),
            );
            let worker_state = state.clone();
            let sequencer_wake = wakeups.changes.clone();
            tasks.spawn(async move {
                let settings = &worker_state.config.sequencer;
                let worker = tokio::sync::Mutex::new(sequencer::Worker::default());
                let worker = &worker;
                workers::run_loop(
                    "sequencer",
                    worker_state.shutdown.clone(),
                    settings.idle_interval,
                    sequencer_wake,
                    || async { worker.lock().await.step(&worker_state.pool, settings).await },
                )
                .await;
                worker
                    .lock()
                    .await
                    .give_up_lease(&worker_state.pool, settings)
                    .await;
                ("sequencer worker", Ok(()))
            });
            let worker_state = state.clone();
            let poller_wake = wakeups.requests.clone();
            tasks.spawn(async move {
                let poller = &worker_state.poller;
                let settings = poller.settings();
                // The loop's syncs wake it when they end, as new requests do.
                let in_flight = InFlight::new(poller_wake.clone());
                let in_flight = &in_flight;
                workers::run_loop(
                    "poller",
                    worker_state.shutdown.clone(),
                    settings.idle_interval,
                    poller_wake,
                    || async move {
                        poller
                            .run_once(in_flight)
                            .await
                            .map(|run| run.outcome(settings.batch_size))
                    },
                )
                .await;
                // Syncs already started are finished and settled before the process
                // ends, rather than left claimed until their lease runs out.
                if let Err(error) = poller.finish(in_flight).await {
                    tracing::warn!(error = %error_chain(&error), "cannot settle the last sync requests; their leases will expire");
                }
                ("poller worker", Ok(()))
            });
        }

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
async fn cancel_on_signal(shutdown: CancellationToken) {
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
