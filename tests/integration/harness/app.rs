//! The real service, started in-process on `127.0.0.1:0` against a fresh database.

use std::collections::HashMap;

use external_db_sync::config::{Config, Env};
use external_db_sync::startup::Application;
use reqwest::{Method, Response};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::postgres::{self, server};

pub const CRON_SECRET: &str = "test-cron-secret-0123456789";
pub const PREFIX: &str = "/api/latest/internal/external-db-sync";

pub struct TestApp {
    pub address: String,
    /// A pool of the test's own, for arranging and asserting.
    pub pool: PgPool,
    pub database_url: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// The configuration a test app starts from, with `overrides` applied on top; parsed by
/// the same code as the real environment.
pub fn config_for(database_url: &str, overrides: &[(&str, &str)]) -> Config {
    let mut variables: HashMap<String, String> = [
        ("DATABASE_URL", database_url),
        ("CRON_SECRET", CRON_SECRET),
        ("BIND_ADDR", "127.0.0.1:0"),
        ("RUN_WORKERS", "false"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    for (name, value) in overrides {
        variables.insert((*name).to_owned(), (*value).to_owned());
    }
    Env::from_lookup(move |name| variables.get(name).cloned())
        .config()
        .expect("a valid test configuration")
}

impl TestApp {
    /// The app with workers off, so that tests drive every stage themselves.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(&[]).await
    }

    pub async fn spawn_with(overrides: &[(&str, &str)]) -> TestApp {
        Self::spawn_on(&server().migrated_database().await, overrides).await
    }

    /// Another instance on an existing internal database, as a second replica.
    pub async fn spawn_on(database_url: &str, overrides: &[(&str, &str)]) -> TestApp {
        let database_url = database_url.to_owned();
        let config = config_for(&database_url, overrides);
        let pool = postgres::pool(&database_url).await;
        let service_pool = external_db_sync::db::connect(&config.database)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let application = Application::build(config, service_pool, shutdown.clone())
            .await
            .unwrap();
        let address = format!("http://{}", application.local_addr());
        let server = tokio::spawn(application.run());
        TestApp {
            address,
            pool,
            database_url,

            client: reqwest::Client::new(),
            shutdown,
            server: Some(server),
        }
    }

    /// Sends a request with `Authorization: Bearer {token}` when a token is given.
    pub async fn request(&self, method: Method, path: &str, bearer: Option<&str>) -> Response {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.address));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the app answers")
    }

    /// `POST {path}` with `body` and the given headers.
    pub async fn post(&self, path: &str, body: Vec<u8>, headers: &[(&str, String)]) -> Response {
        let mut request = self
            .client
            .post(format!("{}{path}", self.address))
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        request.send().await.expect("the app answers")
    }

    /// `GET {PREFIX}/sequencer?{query}` with the right bearer; asserts 200.
    pub async fn run_sequencer(&self, query: &str) -> Value {
        let response = self
            .request(
                Method::GET,
                &format!("{PREFIX}/sequencer?{query}"),
                Some(CRON_SECRET),
            )
            .await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// `GET {PREFIX}/poller?{query}` with the right bearer; asserts 200.
    pub async fn run_poller(&self, query: &str) -> Value {
        let response = self
            .request(
                Method::GET,
                &format!("{PREFIX}/poller?{query}"),
                Some(CRON_SECRET),
            )
            .await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// `POST {PREFIX}/fusebox` with `change` and the right bearer; returns the answer.
    pub async fn set_fusebox(&self, change: Value) -> Value {
        let response = self
            .client
            .post(format!("{}{PREFIX}/fusebox", self.address))
            .bearer_auth(CRON_SECRET)
            .json(&change)
            .send()
            .await
            .expect("the app answers");
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Stops the app and waits until it has shut down; returns its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.server.take().unwrap().await.unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
