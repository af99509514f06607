//! `tenancy create|list|show|delete` and `database add|remove`: managing tenancies and
//! their tenant databases in the internal database. A database is validated exactly as
//! the sync engine validates it (the entry, `sslmode`, the target policy) before
//! anything is written; connection strings are never shown with their password.

use std::io::{BufRead, Read};
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{connect, table, Finished, Lookup, Refused};
use crate::config::Env;
use crate::db::tenancy::{self as tenancies, DatabaseChange};
use crate::sync::external_database::{self, ExternalDatabase};
use crate::sync::policy::TargetPolicy;
use crate::sync::SyncError;

/// Largest `--ca-file` read, in bytes.
const MAX_CA_FILE_BYTES: u64 = 64 * 1024;

#[derive(Debug, Subcommand)]
pub enum TenancyCommand {
    /// Create a tenancy (branch `main`, no databases) and print its id.
    Create {
        /// The project the tenancy belongs to.
        #[arg(long, default_value = "default")]
        project_id: String,
        /// One JSON document instead of the bare id.
        #[arg(long)]
        json: bool,
    },
    /// List every tenancy: id, project, branch, number of databases, creation time.
    List {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a tenancy and its databases: connection strings without their passwords,
    /// read roles, whether a CA certificate is set, and why an entry cannot be used.
    Show {
        tenancy: Uuid,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a tenancy with its users and contact channels from the internal database.
    /// Its tenant databases are the tenants' and are left as they are.
    Delete {
        tenancy: Uuid,
        /// Confirms the deletion; without it nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DatabaseCommand {
    /// Add a tenant database to a tenancy and queue a sync that fills it. The entry is
    /// checked as the sync engine checks it (the URL and its sslmode, the read roles,
    /// the CA certificate, the addresses the host resolves to) and refused with the
    /// reason, writing nothing, when it would not be synced.
    Add {
        tenancy: Uuid,
        /// The database's id within the tenancy (1 to 128 bytes).
        database_id: String,
        /// postgres://user:password@host:5432/dbname?sslmode=require; `-` reads it from
        /// the first line of standard input (keeps the password out of the process list
        /// and the shell history).
        #[arg(long)]
        url: String,
        /// A role granted SELECT on the synced tables; repeat for several.
        #[arg(long = "read-role")]
        read_roles: Vec<String>,
        /// PEM file of the CA that signs the server's certificate (for sslmode=verify-ca
        /// or verify-full); its text is stored in the entry.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// One JSON document instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Remove a tenant database from a tenancy. Its tables stay in the tenant database;
    /// nothing is synced to it any more.
    Remove { tenancy: Uuid, database_id: String },
}

pub async fn tenancy(command: TenancyCommand, env: &Env<Lookup>) -> anyhow::Result<Finished> {
    let pool = connect(env).await?;
    let result = match command {
        TenancyCommand::Create { project_id, json } => {
            let id = tenancies::create(&pool, &project_id)
                .await
                .context("cannot create the tenancy")?;
            if json {
                println!("{}", json!({ "id": id, "projectId": project_id }));
            } else {
                println!("{id}");
            }
            Ok(Finished::Success)
        }
        TenancyCommand::List { json } => {
            let listed = tenancies::list(&pool, None)
                .await
                .context("cannot list the tenancies")?;
            print_list(&listed, json)?;
            Ok(Finished::Success)
        }
        TenancyCommand::Show { tenancy, json } => show(&pool, env, tenancy, json).await,
        TenancyCommand::Delete { tenancy, yes } => {
            if !yes {
                return Err(Refused(format!(
                    "deleting tenancy {tenancy} removes its users and contact channels \
                     from the internal database; add --yes to confirm"
                ))
                .into());
            }
            if !tenancies::delete(&pool, tenancy)
                .await
                .context("cannot delete the tenancy")?
            {
                anyhow::bail!("no tenancy {tenancy}");
            }
            println!("deleted tenancy {tenancy}; its tenant databases were left as they are");
            Ok(Finished::Success)
        }
    };
    pool.close().await;
    result
}

fn print_list(listed: &[tenancies::TenancyListed], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "tenancies": listed }))?
        );
        return Ok(());
    }
    if listed.is_empty() {
        println!("no tenancies: `tenancy create` makes one");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = listed
        .iter()
        .map(|tenancy| {
            vec![
                tenancy.id.to_string(),
                tenancy.project_id.clone(),
                tenancy.branch_id.clone(),
                tenancy.databases.to_string(),
                tenancy.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        table::render(&["ID", "PROJECT", "BRANCH", "DATABASES", "CREATED"], &rows)
    );
    Ok(())
}

/// A configured database as `tenancy show` prints it: never the password.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShownDatabase {
    database_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection: Option<String>,
    read_roles: Vec<String>,
    ca_certificate: bool,
    /// Why the entry cannot be used.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn show(
    pool: &sqlx::PgPool,
    env: &Env<Lookup>,
    tenancy: Uuid,
    as_json: bool,
) -> anyhow::Result<Finished> {
    let listed = tenancies::list(pool, Some(tenancy))
        .await
        .context("cannot read the tenancy")?;
    let Some(listed) = listed.into_iter().next() else {
        anyhow::bail!("no tenancy {tenancy}");
    };
    let config = tenancies::external_databases(pool, tenancy)
        .await
        .context("cannot read the tenancy")?
        .unwrap_or(Value::Null);
    let max = env.sync_settings()?.max_databases_per_tenancy;
    let databases: Vec<ShownDatabase> = match external_database::parse_all(&config, max) {
        Ok(entries) => entries
            .into_iter()
            .map(|(database_id, entry)| shown(database_id, &config, entry))
            .collect(),
        Err(error) => vec![ShownDatabase {
            database_id: external_database::WHOLE_CONFIGURATION.to_owned(),
            connection: None,
            read_roles: Vec::new(),
            ca_certificate: false,
            error: Some(error.to_string()),
        }],
    };
    if as_json {
        let document = json!({
            "id": listed.id, "projectId": listed.project_id, "branchId": listed.branch_id,
            "createdAt": listed.created_at, "databases": databases,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(Finished::Success);
    }
    println!(
        "tenancy {}  project {}  branch {}  created {}",
        listed.id,
        listed.project_id,
        listed.branch_id,
        listed.created_at.format("%Y-%m-%d %H:%M:%S")
    );
    if databases.is_empty() {
        println!("no tenant databases: `database add` adds one");
        return Ok(Finished::Success);
    }
    let rows: Vec<Vec<String>> = databases
        .iter()
        .map(|database| {
            vec![
                database.database_id.clone(),
                match (&database.connection, &database.error) {
                    (Some(connection), _) => connection.clone(),
                    (None, error) => format!("unusable: {}", error.as_deref().unwrap_or("")),
                },
                database.read_roles.join(","),
                if database.ca_certificate { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    println!(
        "{}",
        table::render(&["DATABASE", "CONNECTION", "READ ROLES", "CA"], &rows)
    );
    Ok(Finished::Success)
}

fn shown(
    database_id: String,
    config: &Value,
    entry: Result<ExternalDatabase, SyncError>,
) -> ShownDatabase {
    let ca_certificate = config[&database_id]["caCertificate"].is_string();
    match entry {
        Ok(database) => ShownDatabase {
            connection: Some(database.target.display_url()),
            read_roles: database.read_roles,
            ca_certificate,
            error: None,
            database_id,
        },
        Err(error) => ShownDatabase {
            connection: None,
            read_roles: Vec::new(),
            ca_certificate,
            error: Some(error.to_string()),
            database_id,
        },
    }
}

pub async fn database(command: DatabaseCommand, env: &Env<Lookup>) -> anyhow::Result<Finished> {
    match command {
        DatabaseCommand::Add {
            tenancy,
            database_id,
            url,
            read_roles,
            ca_file,
            json,
        } => {
            let url = if url == "-" { url_from_stdin()? } else { url };
            let mut entry = json!({ "type": "postgres", "connectionString": url });
            if !read_roles.is_empty() {
                entry["readRoles"] = json!(read_roles);
            }
            if let Some(path) = ca_file {
                entry["caCertificate"] = Value::String(read_ca_file(&path)?);
            }
            add(env, tenancy, &database_id, &entry, json).await
        }
        DatabaseCommand::Remove {
            tenancy,
            database_id,
        } => {
            let pool = connect(env).await?;
            let change = tenancies::remove_database(&pool, tenancy, &database_id)
                .await
                .context("cannot change the tenancy")?;
            pool.close().await;
            match change {
                DatabaseChange::UnknownTenancy => anyhow::bail!("no tenancy {tenancy}"),
                DatabaseChange::Conflict => {
                    anyhow::bail!("tenancy {tenancy} has no database {database_id}")
                }
                DatabaseChange::Done | DatabaseChange::TooMany => {}
            }
            println!(
                "removed database {database_id} from tenancy {tenancy}; \
                 its tables were left in the tenant database"
            );
            Ok(Finished::Success)
        }
    }
}

/// `database add`: validated as the sync engine validates, then written.
async fn add(
    env: &Env<Lookup>,
    tenancy: Uuid,
    database_id: &str,
    entry: &Value,
    as_json: bool,
) -> anyhow::Result<Finished> {
    let refused = |error: SyncError| Refused(format!("database {database_id} refused: {error}"));
    let database = external_database::parse_entry(database_id, entry).map_err(refused)?;
    let internal = env.database_settings()?;
    let settings = env.sync_settings()?;
    let policy = TargetPolicy::new(env.private_targets()?, internal.location());
    policy
        .check(&database.target, settings.session.connect_timeout)
        .await
        .map_err(refused)?;
    let pool = connect(env).await?;
    let change = tenancies::add_database(
        &pool,
        tenancy,
        database_id,
        entry,
        settings.max_databases_per_tenancy,
    )
    .await
    .context("cannot change the tenancy")?;
    pool.close().await;
    match change {
        DatabaseChange::Done => {}
        DatabaseChange::UnknownTenancy => anyhow::bail!("no tenancy {tenancy}"),
        DatabaseChange::Conflict => {
            return Err(Refused(format!(
                "tenancy {tenancy} already has a database {database_id}; \
                 `database remove` it first to replace it"
            ))
            .into())
        }
        DatabaseChange::TooMany => {
            return Err(Refused(format!(
                "tenancy {tenancy} already has {} databases, the most allowed \
                 (SYNC_MAX_DATABASES_PER_TENANCY)",
                settings.max_databases_per_tenancy
            ))
            .into())
        }
    }
    let connection = database.target.display_url();
    if as_json {
        let document = json!({
            "tenancyId": tenancy, "databaseId": database_id, "connection": connection,
            "readRoles": database.read_roles, "syncQueued": true,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        println!(
            "added database {database_id} ({connection}) to tenancy {tenancy}; \
             a sync that fills it is queued"
        );
    }
    Ok(Finished::Success)
}

fn url_from_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take(u64::try_from(external_database::MAX_CONNECTION_STRING_BYTES).unwrap_or(4096) + 2)
        .read_line(&mut line)
        .context("cannot read the URL from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn read_ca_file(path: &std::path::Path) -> anyhow::Result<String> {
    let refused = |reason: String| Refused(format!("--ca-file {}: {reason}", path.display()));
    let metadata = std::fs::metadata(path).map_err(|error| refused(error.to_string()))?;
    if metadata.len() > MAX_CA_FILE_BYTES {
        return Err(refused(format!("larger than {MAX_CA_FILE_BYTES} bytes")).into());
    }
    Ok(std::fs::read_to_string(path).map_err(|error| refused(error.to_string()))?)
}
