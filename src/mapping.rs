//! The two mappings from internal tables to a tenant's tables (DESIGN.md §6), and the
//! rows they carry: what the internal database reads ([`crate::db::changes`]) and the
//! sync engine writes ([`crate::sync::statements`]).
//!
//! A batch carries the *current* state of every row it touches, so applying a batch
//! twice, or an older batch after a newer one, converges on the same result; the
//! watermark only moves forward.

use chrono::NaiveDateTime;
use uuid::Uuid;

/// One synced table in the tenant database and the internal rows behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// `users`: one row per `"ProjectUser"`, with its primary e-mail.
    Users,
    /// `contact_channels`: one row per `"ContactChannel"`.
    ContactChannels,
}

impl Mapping {
    pub const ALL: [Mapping; 2] = [Mapping::Users, Mapping::ContactChannels];

    /// The names of [`Mapping::ALL`], in its order.
    pub fn names() -> Vec<&'static str> {
        Mapping::ALL.iter().map(|mapping| mapping.name()).collect()
    }

    /// The mapping's position in [`Mapping::ALL`].
    pub fn index(self) -> usize {
        match self {
            Mapping::Users => 0,
            Mapping::ContactChannels => 1,
        }
    }

    /// The internal table the mapping reads, also its `"DeletedRow"."tableName"`.
    pub fn source_table(self) -> &'static str {
        match self {
            Mapping::Users => "ProjectUser",
            Mapping::ContactChannels => "ContactChannel",
        }
    }

    /// The external table's name, also the key of its watermark in
    /// `_stack_sync_metadata`.
    pub fn name(self) -> &'static str {
        match self {
            Mapping::Users => "users",
            Mapping::ContactChannels => "contact_channels",
        }
    }
}

/// A `users` row as the tenant sees it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UserRow {
    pub id: Uuid,
    pub display_name: Option<String>,
    pub profile_image_url: Option<String>,
    pub primary_email: Option<String>,
    pub primary_email_verified: bool,
    pub signed_up_at: NaiveDateTime,
    /// JSON text: passed through as read, so the engine never parses row contents.
    pub client_metadata: String,
    pub client_read_only_metadata: String,
    pub server_metadata: String,
    pub is_anonymous: bool,
}

/// A `contact_channels` row as the tenant sees it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ContactChannelRow {
    pub id: Uuid,
    pub user_id: Uuid,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub value: String,
    pub is_primary: bool,
    pub is_verified: bool,
    pub used_for_auth: bool,
    pub created_at: NaiveDateTime,
}

/// The rows to write for one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Upserts {
    Users(Vec<UserRow>),
    ContactChannels(Vec<ContactChannelRow>),
}

impl Upserts {
    pub fn len(&self) -> usize {
        match self {
            Upserts::Users(rows) => rows.len(),
            Upserts::ContactChannels(rows) => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One batch of changes of one mapping, in sequence order.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows that exist now, with their current values.
    pub upserts: Upserts,
    /// Ids of rows that no longer exist.
    pub deletes: Vec<Uuid>,
    /// How many changes (sequence ids) the batch covers; several changes of one row
    /// collapse into one upsert or delete.
    pub changes: u64,
    /// The highest sequence id in the batch: the watermark once it is applied.
    pub last_sequence_id: i64,
}
