//! The statements that write one batch of a mapping into a tenant database: deletes
//! and one set-based upsert per batch, never a statement per row.

use std::sync::LazyLock;

use chrono::NaiveDateTime;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::mapping::{ContactChannelRow, Mapping, Upserts, UserRow};

/// Advisory lock (in the tenant database) that serializes writers of `mapping`.
pub fn lock_key(mapping: Mapping) -> i64 {
    // "extdbsm" followed by the mapping's number.
    const BASE: i64 = 0x6578_7464_6273_6d00;
    match mapping {
        Mapping::Users => BASE + 1,
        Mapping::ContactChannels => BASE + 2,
    }
}

/// Opens a transaction and takes the mapping's advisory lock ([`lock_key`]) in it: one
/// simple query of two statements, so one message and one answer. The key is a constant
/// of this program, written into the text; the lock function is schema-qualified, as
/// every catalog function sent to a tenant database is (a tenant's trigger could change
/// the `search_path` of a kept session).
pub fn begin_and_lock(mapping: Mapping) -> &'static str {
    static USERS: LazyLock<String> = LazyLock::new(|| begin_and_lock_text(Mapping::Users));
    static CHANNELS: LazyLock<String> =
        LazyLock::new(|| begin_and_lock_text(Mapping::ContactChannels));
    match mapping {
        Mapping::Users => &USERS,
        Mapping::ContactChannels => &CHANNELS,
    }
}

fn begin_and_lock_text(mapping: Mapping) -> String {
    format!(
        "begin; select pg_catalog.pg_advisory_xact_lock({})",
        lock_key(mapping)
    )
}

/// Deletes the rows whose ids are in `$1`, in one statement.
pub fn delete(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => "delete from users where id = any($1::uuid[])",
        Mapping::ContactChannels => "delete from contact_channels where id = any($1::uuid[])",
    }
}

/// Inserts or updates the rows given as [`Columns`], in one statement whatever their
/// number. Rows whose values did not change are left untouched, so a repeated sync
/// writes nothing.
pub fn upsert(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => UPSERT_USERS,
        Mapping::ContactChannels => UPSERT_CONTACT_CHANNELS,
    }
}

/// `COPY … FROM STDIN (FORMAT binary)` into the mapping's table, in the columns (and
/// types) of [`crate::db::changes::copy_current_rows`].
pub fn copy_in(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => {
            "copy users (id, display_name, profile_image_url, primary_email, \
             primary_email_verified, signed_up_at, client_metadata, client_read_only_metadata, \
             server_metadata, is_anonymous) from stdin (format binary)"
        }
        Mapping::ContactChannels => {
            "copy contact_channels (id, user_id, type, value, is_primary, is_verified, \
             used_for_auth, created_at) from stdin (format binary)"
        }
    }
}

/// The savepoint an initial copy sets before it takes the mapping's table alone
/// ([`take_table_for_load`]); going back to it ([`BACK_TO_LOAD_SAVEPOINT`]) undoes
/// whatever of that step was done, and releases the table's lock.
const LOAD_SAVEPOINT: &str = "_stack_sync_load";

/// Goes back to the savepoint of [`take_table_for_load`].
pub const BACK_TO_LOAD_SAVEPOINT: &str = "rollback to savepoint _stack_sync_load";

/// Before an initial copy into the mapping's empty table, in the transaction that holds
/// the mapping's lock: a savepoint, then the table locked for this transaction alone,
/// if nobody holds it (`nowait`: the copy never waits for a tenant's reader, and never
/// makes readers queue behind a lock it waits for), then whether its primary key is the
/// one `super::schema` creates and no constraint refers to the table, so that
/// [`drop_key`] can be undone by [`add_key`] exactly. One simple query of three
/// statements, one answer: a row of one boolean.
pub fn take_table_for_load(mapping: Mapping) -> &'static str {
    static USERS: LazyLock<String> = LazyLock::new(|| take_table_text(Mapping::Users));
    static CHANNELS: LazyLock<String> = LazyLock::new(|| take_table_text(Mapping::ContactChannels));
    match mapping {
        Mapping::Users => &USERS,
        Mapping::ContactChannels => &CHANNELS,
    }
}

fn take_table_text(mapping: Mapping) -> String {
    let table = mapping.name();
    format!(
        "savepoint {LOAD_SAVEPOINT}; \
         lock table only {table} in access exclusive mode nowait; \
         select exists (select from pg_catalog.pg_constraint \
                        where conrelid = '{table}'::pg_catalog.regclass \
                          and conname = '{table}_pkey' and contype = 'p' \
                          and pg_catalog.pg_get_constraintdef(oid) = 'PRIMARY KEY (id)') \
            and not exists (select from pg_catalog.pg_constraint \
                            where confrelid = '{table}'::pg_catalog.regclass)"
    )
}

/// Drops the primary key of the mapping's table, taken alone by [`take_table_for_load`]:
/// the rows of an initial copy then go in without a key, which [`add_key`] builds
/// once, sorted, in the same transaction.
pub fn drop_key(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => "alter table only users drop constraint users_pkey",
        Mapping::ContactChannels => {
            "alter table only contact_channels drop constraint contact_channels_pkey"
        }
    }
}

/// Builds again the primary key [`drop_key`] dropped, as `super::schema` creates it.
pub fn add_key(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => "alter table only users add constraint users_pkey primary key (id)",
        Mapping::ContactChannels => {
            "alter table only contact_channels \
             add constraint contact_channels_pkey primary key (id)"
        }
    }
}

/// Whether the mapping's table holds any row: one row of one boolean, whatever the
/// table holds.
pub fn has_rows(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => "select exists (select from users)",
        Mapping::ContactChannels => "select exists (select from contact_channels)",
    }
}

/// [`delete`] that deletes nothing unless the mapping's watermark is `$3` (`$2`: the
/// mapping's name).
pub fn guarded_delete(mapping: Mapping) -> &'static str {
    static USERS: LazyLock<String> = LazyLock::new(|| guard_delete(Mapping::Users));
    static CHANNELS: LazyLock<String> = LazyLock::new(|| guard_delete(Mapping::ContactChannels));
    match mapping {
        Mapping::Users => &USERS,
        Mapping::ContactChannels => &CHANNELS,
    }
}

/// [`upsert`] that writes nothing unless the mapping's watermark is the parameter after
/// the columns; the mapping's name is the one before it.
pub fn guarded_upsert(mapping: Mapping) -> &'static str {
    static USERS: LazyLock<String> = LazyLock::new(|| guard_upsert(Mapping::Users));
    static CHANNELS: LazyLock<String> = LazyLock::new(|| guard_upsert(Mapping::ContactChannels));
    match mapping {
        Mapping::Users => &USERS,
        Mapping::ContactChannels => &CHANNELS,
    }
}

/// Up to `$2` rows of the mapping's table with an id after `$1` (none: from the start),
/// in id order, each as its id and the digest [`crate::db::verify`] computes for the
/// source row.
pub fn verify_page(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => {
            "select id, pg_catalog.md5(row(display_name, profile_image_url, primary_email, \
             primary_email_verified, signed_up_at, client_metadata, client_read_only_metadata, \
             server_metadata, is_anonymous)::pg_catalog.text) as digest \
             from users where $1::uuid is null or id OPERATOR(pg_catalog.>) $1 \
             order by id limit $2"
        }
        Mapping::ContactChannels => {
            "select id, pg_catalog.md5(row(user_id, type, value, is_primary, is_verified, \
             used_for_auth, created_at)::pg_catalog.text) as digest \
             from contact_channels where $1::uuid is null or id OPERATOR(pg_catalog.>) $1 \
             order by id limit $2"
        }
    }
}

/// The staging table of a large batch, in the session's temporary schema, dropped when
/// the transaction ends (committed or not: a failed batch leaves nothing behind). It
/// takes the rows of [`crate::db::changes::copy_batch`], in its columns and types.
pub fn create_stage(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => {
            "create temporary table _stack_sync_stage_users (id uuid, present boolean, \
             display_name text, \
             profile_image_url text, primary_email text, primary_email_verified boolean, \
             signed_up_at timestamp, client_metadata jsonb, client_read_only_metadata jsonb, \
             server_metadata jsonb, is_anonymous boolean) on commit drop"
        }
        Mapping::ContactChannels => {
            "create temporary table _stack_sync_stage_contact_channels (id uuid, \
             present boolean, user_id uuid, \
             type text, value text, is_primary boolean, is_verified boolean, \
             used_for_auth boolean, created_at timestamp) on commit drop"
        }
    }
}

/// `COPY … FROM STDIN (FORMAT binary)` into the staging table of [`create_stage`].
pub fn copy_into_stage(mapping: Mapping) -> &'static str {
    match mapping {
        Mapping::Users => "copy pg_temp._stack_sync_stage_users from stdin (format binary)",
        Mapping::ContactChannels => {
            "copy pg_temp._stack_sync_stage_contact_channels from stdin (format binary)"
        }
    }
}

/// Applies the staged batch and moves the mapping's watermark forward to `through` (the
/// batch's last sequence id), as one simple query of three statements, so one message
/// and one answer: deletes the rows that are gone, upserts the rows that exist (the
/// update and its "changed at all" condition of [`upsert`]), advances. Each id is
/// staged once, gone or present, so a deletion after an earlier write of the same row
/// in the batch wins, as with [`delete`] and [`upsert`]. Sent in the transaction that
/// holds the mapping's lock; the commit goes once it answered, so a link cut while it
/// runs leaves the transaction to be rolled back.
pub fn merge_stage(mapping: Mapping, through: i64) -> String {
    static USERS: LazyLock<String> = LazyLock::new(|| apply_stage_text(Mapping::Users));
    static CHANNELS: LazyLock<String> =
        LazyLock::new(|| apply_stage_text(Mapping::ContactChannels));
    let apply: &str = match mapping {
        Mapping::Users => &USERS,
        Mapping::ContactChannels => &CHANNELS,
    };
    format!(
        "{apply};\n\
         update _stack_sync_metadata \
         set last_synced_sequence_id = {through}, updated_at = pg_catalog.now() \
         where mapping_name = '{}' and last_synced_sequence_id < {through}",
        mapping.name()
    )
}

/// The delete and the upsert of [`merge_stage`].
fn apply_stage_text(mapping: Mapping) -> String {
    let (table, columns) = match mapping {
        Mapping::Users => (
            "users",
            "id, display_name, profile_image_url, primary_email, primary_email_verified, \
             signed_up_at, client_metadata, client_read_only_metadata, server_metadata, \
             is_anonymous",
        ),
        Mapping::ContactChannels => (
            "contact_channels",
            "id, user_id, type, value, is_primary, is_verified, used_for_auth, created_at",
        ),
    };
    let stage = format!("pg_temp._stack_sync_stage_{table}");
    let upsert = upsert(mapping);
    let on_conflict = &upsert[upsert
        .find("on conflict (id)")
        .expect("every upsert has an on conflict clause")..];
    format!(
        "delete from {table} using {stage} as stage \
         where {table}.id = stage.id and not stage.present;\n\
         insert into {table} ({columns}) select {columns} from {stage} where present\n\
         {}",
        on_conflict.trim_end()
    )
}

/// How many parameters (one array per column) [`upsert`] takes.
fn column_count(mapping: Mapping) -> usize {
    match mapping {
        Mapping::Users => 10,
        Mapping::ContactChannels => 8,
    }
}

/// The condition of the guarded statements: the mapping's watermark, with the mapping's
/// name in `$name` and the expected watermark in `$name + 1`.
fn watermark_is(name: usize) -> String {
    format!(
        "exists (select from _stack_sync_metadata \
         where mapping_name = ${name} and last_synced_sequence_id = ${})",
        name + 1
    )
}

fn guard_delete(mapping: Mapping) -> String {
    format!("{} and {}", delete(mapping), watermark_is(2))
}

fn guard_upsert(mapping: Mapping) -> String {
    let guard = watermark_is(column_count(mapping) + 1);
    let sql = upsert(mapping);
    let conflict = sql
        .find("on conflict (id)")
        .expect("every upsert has an on conflict clause");
    format!("{}where {guard}\n{}", &sql[..conflict], &sql[conflict..])
}

/// Rows a batch's statements changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub upserted: u64,
    pub deleted: u64,
}

const UPSERT_USERS: &str = r#"
insert into users (
    id, display_name, profile_image_url, primary_email, primary_email_verified,
    signed_up_at, client_metadata, client_read_only_metadata, server_metadata, is_anonymous)
select
    id, display_name, profile_image_url, primary_email, primary_email_verified,
    signed_up_at, client_metadata::jsonb, client_read_only_metadata::jsonb,
    server_metadata::jsonb, is_anonymous
from unnest(
    $1::uuid[], $2::text[], $3::text[], $4::text[], $5::boolean[],
    $6::timestamp[], $7::text[], $8::text[], $9::text[], $10::boolean[])
    as batch(id, display_name, profile_image_url, primary_email, primary_email_verified,
             signed_up_at, client_metadata, client_read_only_metadata, server_metadata,
             is_anonymous)
on conflict (id) do update set
    display_name = excluded.display_name,
    profile_image_url = excluded.profile_image_url,
    primary_email = excluded.primary_email,
    primary_email_verified = excluded.primary_email_verified,
    signed_up_at = excluded.signed_up_at,
    client_metadata = excluded.client_metadata,
    client_read_only_metadata = excluded.client_read_only_metadata,
    server_metadata = excluded.server_metadata,
    is_anonymous = excluded.is_anonymous
where (users.display_name, users.profile_image_url, users.primary_email,
       users.primary_email_verified, users.signed_up_at, users.client_metadata,
       users.client_read_only_metadata, users.server_metadata, users.is_anonymous)
    is distinct from
      (excluded.display_name, excluded.profile_image_url, excluded.primary_email,
       excluded.primary_email_verified, excluded.signed_up_at, excluded.client_metadata,
       excluded.client_read_only_metadata, excluded.server_metadata, excluded.is_anonymous)
"#;

const UPSERT_CONTACT_CHANNELS: &str = r#"
insert into contact_channels (
    id, user_id, type, value, is_primary, is_verified, used_for_auth, created_at)
select * from unnest(
    $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::boolean[], $6::boolean[],
    $7::boolean[], $8::timestamp[])
on conflict (id) do update set
    user_id = excluded.user_id,
    type = excluded.type,
    value = excluded.value,
    is_primary = excluded.is_primary,
    is_verified = excluded.is_verified,
    used_for_auth = excluded.used_for_auth,
    created_at = excluded.created_at
where (contact_channels.user_id, contact_channels.type, contact_channels.value,
       contact_channels.is_primary, contact_channels.is_verified,
       contact_channels.used_for_auth, contact_channels.created_at)
    is distinct from
      (excluded.user_id, excluded.type, excluded.value, excluded.is_primary,
       excluded.is_verified, excluded.used_for_auth, excluded.created_at)
"#;

/// A batch's upserts as one array per column: the parameters of
/// [`upsert`].
pub enum Columns {
    Users(UserColumns),
    ContactChannels(ContactChannelColumns),
}

impl Columns {
    pub fn of(upserts: &Upserts) -> Self {
        match upserts {
            Upserts::Users(rows) => Columns::Users(UserColumns::from(rows.as_slice())),
            Upserts::ContactChannels(rows) => {
                Columns::ContactChannels(ContactChannelColumns::from(rows.as_slice()))
            }
        }
    }

    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        match self {
            Columns::Users(columns) => columns.params().to_vec(),
            Columns::ContactChannels(columns) => columns.params().to_vec(),
        }
    }
}

/// `users` rows turned into one array per column, for `unnest`.
pub struct UserColumns {
    id: Vec<Uuid>,
    display_name: Vec<Option<String>>,
    profile_image_url: Vec<Option<String>>,
    primary_email: Vec<Option<String>>,
    primary_email_verified: Vec<bool>,
    signed_up_at: Vec<NaiveDateTime>,
    client_metadata: Vec<String>,
    client_read_only_metadata: Vec<String>,
    server_metadata: Vec<String>,
    is_anonymous: Vec<bool>,
}

impl From<&[UserRow]> for UserColumns {
    fn from(rows: &[UserRow]) -> Self {
        Self {
            id: rows.iter().map(|row| row.id).collect(),
            display_name: rows.iter().map(|row| row.display_name.clone()).collect(),
            profile_image_url: rows
                .iter()
                .map(|row| row.profile_image_url.clone())
                .collect(),
            primary_email: rows.iter().map(|row| row.primary_email.clone()).collect(),
            primary_email_verified: rows.iter().map(|row| row.primary_email_verified).collect(),
            signed_up_at: rows.iter().map(|row| row.signed_up_at).collect(),
            client_metadata: rows.iter().map(|row| row.client_metadata.clone()).collect(),
            client_read_only_metadata: rows
                .iter()
                .map(|row| row.client_read_only_metadata.clone())
                .collect(),
            server_metadata: rows.iter().map(|row| row.server_metadata.clone()).collect(),
            is_anonymous: rows.iter().map(|row| row.is_anonymous).collect(),
        }
    }
}

impl UserColumns {
    fn params(&self) -> [&(dyn ToSql + Sync); 10] {
        [
            &self.id,
            &self.display_name,
            &self.profile_image_url,
            &self.primary_email,
            &self.primary_email_verified,
            &self.signed_up_at,
            &self.client_metadata,
            &self.client_read_only_metadata,
            &self.server_metadata,
            &self.is_anonymous,
        ]
    }
}

/// `contact_channels` rows turned into one array per column, for `unnest`.
pub struct ContactChannelColumns {
    id: Vec<Uuid>,
    user_id: Vec<Uuid>,
    kind: Vec<String>,
    value: Vec<String>,
    is_primary: Vec<bool>,
    is_verified: Vec<bool>,
    used_for_auth: Vec<bool>,
    created_at: Vec<NaiveDateTime>,
}

impl From<&[ContactChannelRow]> for ContactChannelColumns {
    fn from(rows: &[ContactChannelRow]) -> Self {
        Self {
            id: rows.iter().map(|row| row.id).collect(),
            user_id: rows.iter().map(|row| row.user_id).collect(),
            kind: rows.iter().map(|row| row.kind.clone()).collect(),
            value: rows.iter().map(|row| row.value.clone()).collect(),
            is_primary: rows.iter().map(|row| row.is_primary).collect(),
            is_verified: rows.iter().map(|row| row.is_verified).collect(),
            used_for_auth: rows.iter().map(|row| row.used_for_auth).collect(),
            created_at: rows.iter().map(|row| row.created_at).collect(),
        }
    }
}

impl ContactChannelColumns {
    fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.id,
            &self.user_id,
            &self.kind,
            &self.value,
            &self.is_primary,
            &self.is_verified,
            &self.used_for_auth,
            &self.created_at,
        ]
    }
}
