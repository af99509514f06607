//! The tables this service owns in a tenant database (DESIGN.md §6), who may read them,
//! and which tenancy the database belongs to.
//!
//! [`prepare`] runs at the start of every sync, in one transaction under an advisory
//! lock: two runs racing to create the tables would otherwise fail on PostgreSQL's
//! catalog uniqueness (`create table if not exists` is not safe under concurrency).
//!
//! The synced tables carry a guard: a statement trigger that takes the mapping's
//! watermark back to -1 when anyone but this service writes to the table (a `truncate`,
//! a `delete`, an edit by hand). The next sync sees the watermark gone back and brings
//! the table back to the source ([`super::apply`]). Sessions of this service set
//! [`WRITER_SETTING`], which the guard lets through. A table dropped and created again,
//! or whose guard was dropped or disabled, gets its watermark taken back here.

use std::collections::BTreeSet;

use tokio_postgres::Client;
use uuid::Uuid;

use super::error::SyncError;
use crate::mapping::Mapping;

/// Advisory lock key serializing schema preparation in a tenant database ("extdbsch").
const SCHEMA_LOCK_KEY: i64 = 0x6578_7464_6273_6368;

/// The synced tables, in the fixed shape of DESIGN.md §6.
const CREATE_DATA_TABLES: &str = r#"
create table if not exists users (
    id uuid primary key,
    display_name text,
    profile_image_url text,
    primary_email text,
    primary_email_verified boolean not null default false,
    signed_up_at timestamp without time zone not null,
    client_metadata jsonb not null default '{}',
    client_read_only_metadata jsonb not null default '{}',
    server_metadata jsonb not null default '{}',
    is_anonymous boolean not null default false
);
create table if not exists contact_channels (
    id uuid primary key,
    user_id uuid not null,
    type text not null,
    value text not null,
    is_primary boolean not null,
    is_verified boolean not null,
    used_for_auth boolean not null,
    created_at timestamp without time zone not null
);
"#;

/// The bookkeeping table: one watermark per mapping, and the owning tenancy.
const CREATE_METADATA_TABLE: &str = r#"
create table if not exists _stack_sync_metadata (
    mapping_name text primary key,
    last_synced_sequence_id bigint not null default -1,
    updated_at timestamp without time zone not null default now(),
    tenancy_id uuid
)
"#;

/// The session setting that tells the guard a write is this service's own: set by
/// [`super::connect`] on every session it opens.
pub const WRITER_SETTING: &str = "external_db_sync.writer";

/// The name of the guard's trigger on each synced table, and of its function.
const GUARD: &str = "_stack_sync_outside_change";

/// The guard's function: takes the watermark of the mapping named by the trigger's
/// argument back to -1, unless the session is this service's. `security definer`, so
/// that it works for any role allowed to write to the table, with the `search_path` of
/// the session that creates it (the tables' schema, then `pg_temp`).
const CREATE_GUARD_FUNCTION: &str = r#"
create function _stack_sync_outside_change() returns trigger
language plpgsql security definer set search_path from current as $guard$
begin
    if pg_catalog.current_setting('external_db_sync.writer', true) is distinct from 'on' then
        update _stack_sync_metadata
        set last_synced_sequence_id = -1, updated_at = pg_catalog.now()
        where mapping_name = tg_argv[0] and last_synced_sequence_id <> -1;
    end if;
    return null;
end
$guard$;
revoke all on function _stack_sync_outside_change() from public;
"#;

/// The most grants to other roles the synced tables may carry: three tables, at most
/// 32 read roles each, and room for what an owner granted by hand and we revoke.
const MAX_GRANTS: i64 = 1024;

/// Tables whose privileges this service manages, and whether read roles get `SELECT`.
const MANAGED_TABLES: [(&str, bool); 3] = [
    ("users", true),
    ("contact_channels", true),
    ("_stack_sync_metadata", false),
];

/// Creates what is missing, refuses a database that belongs to another tenancy, claims
/// it for `tenancy_id`, and makes the privileges on the tables exactly: `SELECT` for each
/// of `read_roles` on the synced tables, nothing for anyone else but the owner.
pub async fn prepare(
    client: &mut Client,
    tenancy_id: Uuid,
    read_roles: &[String],
) -> Result<(), SyncError> {
    let transaction = client.transaction().await.map_err(SyncError::target)?;
    transaction
        .execute(
            "select pg_catalog.pg_advisory_xact_lock($1)",
            &[&SCHEMA_LOCK_KEY],
        )
        .await
        .map_err(SyncError::target)?;
    transaction
        .batch_execute(CREATE_METADATA_TABLE)
        .await
        .map_err(SyncError::target)?;
    let foreign = transaction
        .query_opt(
            "select 1 from _stack_sync_metadata \
             where tenancy_id is not null and tenancy_id <> $1 limit 1",
            &[&tenancy_id],
        )
        .await
        .map_err(SyncError::target)?;
    if foreign.is_some() {
        return Err(SyncError::ForeignOwner(
            "_stack_sync_metadata names another tenancy; give each tenancy its own database"
                .to_owned(),
        ));
    }
    let mapping_names = Mapping::names();
    let missing: Vec<String> = transaction
        .query_one(
            "select array(select t from pg_catalog.unnest($1::pg_catalog.text[]) t \
                          where pg_catalog.to_regclass(t) is null)",
            &[&mapping_names],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(SyncError::target)?;
    transaction
        .batch_execute(CREATE_DATA_TABLES)
        .await
        .map_err(SyncError::target)?;
    transaction
        .execute(
            "insert into _stack_sync_metadata (mapping_name, tenancy_id) \
             select unnest($1::text[]), $2 \
             on conflict (mapping_name) do update set tenancy_id = excluded.tenancy_id \
             where _stack_sync_metadata.tenancy_id is null",
            &[&mapping_names, &tenancy_id],
        )
        .await
        .map_err(SyncError::target)?;
    let unguarded = guard_tables(&transaction, &mapping_names).await?;
    // A table missing on a database's first sync, or one whose watermark is at the
    // start already, loses nothing: only a watermark taken back is worth a warning.
    let suspect: BTreeSet<&String> = missing.iter().chain(&unguarded).collect();
    if !suspect.is_empty() {
        let went_back: Vec<String> = transaction
            .query(
                "update _stack_sync_metadata set last_synced_sequence_id = -1, \
                        updated_at = pg_catalog.now() \
                 where mapping_name = any($1::pg_catalog.text[]) \
                   and last_synced_sequence_id <> -1 \
                 returning mapping_name",
                &[&suspect.into_iter().collect::<Vec<_>>()],
            )
            .await
            .and_then(|rows| rows.iter().map(|row| row.try_get(0)).collect())
            .map_err(SyncError::target)?;
        if !went_back.is_empty() {
            tracing::warn!(
                %tenancy_id,
                tables = ?went_back,
                "a synced table of a tenant database was created again, or had lost its \
                 guard: its watermark goes back, and the next sync brings it back to the source"
            );
        }
    }
    reconcile_privileges(&transaction, read_roles).await?;
    transaction.commit().await.map_err(SyncError::target)
}

/// Puts the guard on every synced table that lacks it (or has it disabled), and returns
/// those tables whose guard was gone while its function was there: what was written to
/// them meanwhile is unknown. A database that never had the guard (first sync, or synced
/// before the guard existed) gets it without that.
async fn guard_tables(
    transaction: &tokio_postgres::Transaction<'_>,
    tables: &[&str],
) -> Result<Vec<String>, SyncError> {
    // At most one trigger of that name per table: the answers are bounded.
    let row = transaction
        .query_one(
            "select pg_catalog.to_regprocedure($1 || '()') is not null, \
                    pg_catalog.array_agg(c.relname::pg_catalog.text) \
                        filter (where t.tgname is not null), \
                    pg_catalog.array_agg(c.relname::pg_catalog.text) \
                        filter (where t.tgenabled in ('O', 'A')) \
             from pg_catalog.unnest($2::pg_catalog.text[]) x \
             join pg_catalog.pg_class c on c.oid = pg_catalog.to_regclass(x) \
             left join pg_catalog.pg_trigger t on t.tgrelid = c.oid and t.tgname = $1",
            &[&GUARD, &tables],
        )
        .await
        .map_err(SyncError::target)?;
    let installed: bool = row.try_get(0).map_err(SyncError::target)?;
    let present: Option<Vec<String>> = row.try_get(1).map_err(SyncError::target)?;
    let enabled: Option<Vec<String>> = row.try_get(2).map_err(SyncError::target)?;
    let (present, enabled) = (present.unwrap_or_default(), enabled.unwrap_or_default());
    if !installed {
        transaction
            .batch_execute(CREATE_GUARD_FUNCTION)
            .await
            .map_err(SyncError::target)?;
    }
    let mut unguarded = Vec::new();
    for table in tables
        .iter()
        .filter(|table| !enabled.iter().any(|t| t == *table))
    {
        // The table names are this service's constants, never tenant input. A guard
        // there but disabled is dropped first.
        let drop_disabled = if present.iter().any(|t| t == *table) {
            format!("drop trigger {GUARD} on {table};")
        } else {
            String::new()
        };
        transaction
            .batch_execute(&format!(
                "{drop_disabled} \
                 create trigger {GUARD} after insert or update or delete or truncate \
                 on {table} for each statement execute procedure {GUARD}('{table}')"
            ))
            .await
            .map_err(SyncError::target)?;
        if installed {
            unguarded.push((*table).to_owned());
        }
    }
    Ok(unguarded)
}

/// Grants and revokes only what differs, so that a steady state issues no DDL.
///
/// Kept whole: the read of the current grants, the comparison and the statements that
/// follow from it are one decision, easier to check side by side.
async fn reconcile_privileges(
    transaction: &tokio_postgres::Transaction<'_>,
    read_roles: &[String],
) -> Result<(), SyncError> {
    let tables: Vec<&str> = MANAGED_TABLES.iter().map(|(table, _)| *table).collect();
    // Every privilege on the managed tables held by someone other than their owner;
    // grantee 0 is PUBLIC. Catalog objects are schema-qualified, and the answer is
    // capped: a database whose tables carry more grants than this fails alone.
    let rows = transaction
        .query(
            "select c.relname::pg_catalog.text, \
                    coalesce(r.rolname::pg_catalog.text, ''), \
                    a.privilege_type::pg_catalog.text \
             from pg_catalog.pg_class c \
             cross join lateral pg_catalog.aclexplode(c.relacl) a \
             left join pg_catalog.pg_roles r on r.oid = a.grantee \
             where c.oid = any(array(select pg_catalog.to_regclass(t)::pg_catalog.oid \
                                     from pg_catalog.unnest($1::pg_catalog.text[]) t)) \
               and a.grantee <> c.relowner \
             limit $2",
            &[&tables, &(MAX_GRANTS + 1)],
        )
        .await
        .map_err(SyncError::target)?;
    if rows.len() > MAX_GRANTS as usize {
        return Err(SyncError::Malformed(format!(
            "the synced tables carry more than {MAX_GRANTS} privileges of other roles; \
             revoke what readRoles does not name"
        )));
    }
    let held = rows
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
        .collect::<Result<BTreeSet<(String, String, String)>, tokio_postgres::Error>>()
        .map_err(|_| SyncError::Malformed("unreadable privileges".to_owned()))?;
    let wanted: BTreeSet<(String, String, String)> = MANAGED_TABLES
        .iter()
        .filter(|(_, readable)| *readable)
        .flat_map(|(table, _)| {
            read_roles
                .iter()
                .map(|role| ((*table).to_owned(), role.clone(), "SELECT".to_owned()))
        })
        .collect();

    for (table, grantee, privilege) in held.difference(&wanted) {
        // Privilege names come from aclexplode and are checked against the fixed list,
        // never taken from tenant input.
        let privilege = known_privilege(privilege)?;
        let grantee = if grantee.is_empty() {
            "public".to_owned()
        } else {
            quote_identifier(grantee)
        };
        let statement = format!("revoke {privilege} on table {table} from {grantee}");
        transaction
            .batch_execute(&statement)
            .await
            .map_err(SyncError::target)?;
    }
    for (table, role, _) in wanted.difference(&held) {
        let statement = format!(
            "grant select on table {table} to {}",
            quote_identifier(role)
        );
        transaction
            .batch_execute(&statement)
            .await
            .map_err(SyncError::target)?;
    }
    Ok(())
}

fn known_privilege(privilege: &str) -> Result<&'static str, SyncError> {
    const KNOWN: [&str; 8] = [
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "TRUNCATE",
        "REFERENCES",
        "TRIGGER",
        "MAINTAIN",
    ];
    KNOWN
        .into_iter()
        .find(|known| *known == privilege)
        .ok_or_else(|| SyncError::InvalidConfig(format!("unexpected privilege {privilege}")))
}

/// Quotes an SQL identifier: the one place identifiers are built from input.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Checks the role names of a tenancy's `readRoles` before they reach SQL.
pub fn validate_role_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("role names must be 1 to 63 bytes long".to_owned());
    }
    if name.contains('\0') {
        return Err("role names cannot contain NUL".to_owned());
    }
    if name.eq_ignore_ascii_case("public") {
        return Err("readRoles cannot name PUBLIC: nothing is granted to everyone".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_identifier("analyst"), "\"analyst\"");
        assert_eq!(quote_identifier("we\"ird; drop"), "\"we\"\"ird; drop\"");
    }

    #[test]
    fn validates_role_names() {
        assert!(validate_role_name("analyst").is_ok());
        assert!(validate_role_name("").is_err());
        assert!(validate_role_name(&"x".repeat(64)).is_err());
        assert!(validate_role_name("a\0b").is_err());
        assert!(validate_role_name("PUBLIC").is_err());
    }

    #[test]
    fn the_guard_lets_through_the_setting_the_sessions_set() {
        assert!(CREATE_GUARD_FUNCTION.contains(&format!(
            "current_setting('{WRITER_SETTING}', true) is distinct from 'on'"
        )));
    }

    #[test]
    fn only_known_privileges_are_revoked() {
        assert_eq!(known_privilege("INSERT").unwrap(), "INSERT");
        assert!(known_privilege("SELECT; drop table users").is_err());
    }
}
