//! A tenancy's external databases, from `"Tenancy"."config".dbSync.externalDatabases`:
//!
//! ```json
//! {"<dbId>": {"type": "postgres", "connectionString": "postgres://…", "readRoles": ["analyst"],
//!             "caCertificate": "-----BEGIN CERTIFICATE-----…"}}
//! ```
//!
//! Each entry is parsed on its own, so one broken entry is reported for that database
//! and does not stop the others.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::SyncError;
use super::schema::validate_role_name;
use super::target::Target;

/// One usable entry.
#[derive(Debug, Clone)]
pub struct ExternalDatabase {
    pub target: Target,
    /// Roles granted `SELECT` on the synced tables.
    pub read_roles: Vec<String>,
    /// SHA-256 of the entry as configured: tells one configuration from another
    /// without keeping the connection string (and its password) around.
    pub fingerprint: [u8; 32],
}

/// One configured database: its id, and the entry or why it cannot be used.
pub type Entry = (String, Result<ExternalDatabase, SyncError>);

/// The id under which a problem with a tenancy's configuration as a whole (too many
/// databases, an unusable id) is recorded in `"ExternalDbSyncStatus"`. No database may
/// have it.
pub const WHOLE_CONFIGURATION: &str = "*";

/// Longest database id, in bytes: ids key the recorded statuses.
pub const MAX_DATABASE_ID_BYTES: usize = 128;
/// Most `readRoles` of one database.
pub const MAX_READ_ROLES: usize = 32;
/// Longest `connectionString`, in bytes.
pub const MAX_CONNECTION_STRING_BYTES: usize = 4096;
/// Largest entry, in bytes of JSON: room for a 64 KiB `caCertificate` and the rest.
pub const MAX_ENTRY_BYTES: usize = 96 * 1024;

/// The entries of `externalDatabases` by id, in id order. `null` (no `dbSync` section)
/// means no databases; anything but an object, more than `max_databases` entries, or an
/// unusable id is an error of the whole configuration.
pub fn parse_all(
    external_databases: &Value,
    max_databases: usize,
) -> Result<Vec<Entry>, SyncError> {
    let entries = match external_databases {
        Value::Null => return Ok(Vec::new()),
        Value::Object(entries) => entries,
        _ => {
            return Err(SyncError::InvalidConfig(
                "dbSync.externalDatabases must be an object keyed by database id".to_owned(),
            ))
        }
    };
    if entries.len() > max_databases {
        return Err(SyncError::InvalidConfig(format!(
            "dbSync.externalDatabases lists {} databases; at most {max_databases} are allowed \
             per tenancy (SYNC_MAX_DATABASES_PER_TENANCY)",
            entries.len()
        )));
    }
    for id in entries.keys() {
        validate_database_id(id)?;
    }
    let mut parsed: Vec<_> = entries
        .iter()
        .map(|(id, entry)| (id.clone(), parse_one(entry)))
        .collect();
    parsed.sort_by(|(a, _), (b, _)| a.cmp(b));
    Ok(parsed)
}

/// One entry with its id, validated as [`parse_all`] validates each: for an operator
/// adding a database, before anything is written.
pub fn parse_entry(id: &str, entry: &Value) -> Result<ExternalDatabase, SyncError> {
    validate_database_id(id)?;
    parse_one(entry)
}

fn validate_database_id(id: &str) -> Result<(), SyncError> {
    let reason = if id.is_empty() || id.len() > MAX_DATABASE_ID_BYTES {
        format!("database ids must be 1 to {MAX_DATABASE_ID_BYTES} bytes long")
    } else if id.chars().any(char::is_control) {
        "database ids cannot contain control characters".to_owned()
    } else if id == WHOLE_CONFIGURATION {
        format!("`{WHOLE_CONFIGURATION}` is reserved and cannot be a database id")
    } else {
        return Ok(());
    };
    Err(SyncError::InvalidConfig(format!(
        "dbSync.externalDatabases: {reason}"
    )))
}

fn parse_one(entry: &Value) -> Result<ExternalDatabase, SyncError> {
    let invalid = |reason: &str| SyncError::InvalidConfig(reason.to_owned());
    let serialized = entry.to_string();
    if serialized.len() > MAX_ENTRY_BYTES {
        return Err(invalid(&format!(
            "the entry is {} bytes of JSON; at most {MAX_ENTRY_BYTES} are allowed",
            serialized.len()
        )));
    }
    let entry = entry
        .as_object()
        .ok_or_else(|| invalid("each external database must be an object"))?;
    match entry.get("type").and_then(Value::as_str) {
        Some("postgres") => {}
        Some(other) => {
            return Err(invalid(&format!(
                "type `{}` is not supported (only `postgres`)",
                other
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(40)
                    .collect::<String>()
            )))
        }
        None => return Err(invalid("type is missing (expected `postgres`)")),
    }
    let connection_string = entry
        .get("connectionString")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("connectionString is missing or not a string"))?;
    if connection_string.len() > MAX_CONNECTION_STRING_BYTES {
        return Err(invalid(&format!(
            "connectionString is {} bytes long; at most {MAX_CONNECTION_STRING_BYTES} are allowed",
            connection_string.len()
        )));
    }
    let mut target = Target::parse(connection_string)?;
    match entry.get("caCertificate") {
        None | Some(Value::Null) => {}
        Some(Value::String(pem)) => target = target.with_ca_certificate(pem)?,
        Some(_) => return Err(invalid("caCertificate must be PEM text")),
    }
    let read_roles = parse_read_roles(entry.get("readRoles"))?;
    let fingerprint = Sha256::digest(serialized).into();
    Ok(ExternalDatabase {
        target,
        read_roles,
        fingerprint,
    })
}

/// `readRoles`: at most [`MAX_READ_ROLES`] valid role names; absent means none.
fn parse_read_roles(roles: Option<&Value>) -> Result<Vec<String>, SyncError> {
    let invalid = |reason: &str| SyncError::InvalidConfig(reason.to_owned());
    match roles {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(roles)) if roles.len() > MAX_READ_ROLES => Err(invalid(&format!(
            "readRoles lists {} roles; at most {MAX_READ_ROLES} are allowed",
            roles.len()
        ))),
        Some(Value::Array(roles)) => roles
            .iter()
            .map(|role| {
                let role = role
                    .as_str()
                    .ok_or_else(|| invalid("readRoles must be a list of role names"))?;
                validate_role_name(role)
                    .map_err(|reason| invalid(&format!("readRoles: {reason}")))?;
                Ok(role.to_owned())
            })
            .collect(),
        Some(_) => Err(invalid("readRoles must be a list of role names")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn no_configuration_means_no_databases() {
        assert!(parse_all(&Value::Null, 10).unwrap().is_empty());
        assert!(parse_all(&json!({}), 10).unwrap().is_empty());
        assert!(parse_all(&json!(["x"]), 10).is_err());
    }

    #[test]
    fn ids_that_cannot_key_a_status_refuse_the_whole_configuration() {
        let entry = json!({"type": "postgres", "connectionString": "postgres://a@h/x"});
        for id in ["", "*", "a\nb", &"x".repeat(129)] {
            let error = parse_all(&json!({ id: entry }), 10).unwrap_err();
            assert!(
                error.to_string().contains("dbSync.externalDatabases:"),
                "{error}"
            );
        }
        assert!(parse_all(&json!({ "x".repeat(128): entry }), 10).is_ok());
    }

    #[test]
    fn each_entry_stands_on_its_own() {
        let parsed = parse_all(
            &json!({
            "b-good": {"type": "postgres", "connectionString": "postgres://a@db.example.com/x",
                       "readRoles": ["analyst", "bi \"team\""]},
            "a-mysql": {"type": "mysql", "connectionString": "mysql://a@h/x"},
            "c-roles": {"type": "postgres", "connectionString": "postgres://a@h/x",
                        "readRoles": "analyst"},
            "d-missing": {"type": "postgres"},
            }),
            10,
        )
        .unwrap();
        let ids: Vec<&str> = parsed.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a-mysql", "b-good", "c-roles", "d-missing"]);
        let error = |index: usize| parsed[index].1.as_ref().unwrap_err().to_string();
        assert!(error(0).contains("type `mysql` is not supported"));
        let good = parsed[1].1.as_ref().unwrap();
        assert_eq!(good.read_roles, ["analyst", "bi \"team\""]);
        assert!(error(2).contains("readRoles must be a list"));
        assert!(error(3).contains("connectionString is missing"));
        assert!(parsed.iter().all(|(_, entry)| entry
            .as_ref()
            .map_or_else(|error| !error.is_retryable(), |_| true)));
    }
}

/// Properties over arbitrary configurations (`proptest`, a bounded number of cases).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Any JSON value, a few levels deep, with keys and strings that sometimes are the
    /// ones the parser looks for.
    fn json_value() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("type".to_owned()),
            Just("connectionString".to_owned()),
            Just("readRoles".to_owned()),
            Just("caCertificate".to_owned()),
            "\\PC{0,12}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            Just(Value::from("postgres")),
            Just(Value::from("postgres://sync:pw@db.example.com/app")),
            "\\PC{0,40}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any value where the configuration goes: entries or configuration errors,
        /// never a panic, never more entries than allowed.
        #[test]
        fn any_configuration_is_entries_or_a_configuration_error(value in json_value()) {
            match parse_all(&value, 4) {
                Ok(entries) => {
                    prop_assert!(entries.len() <= 4);
                    for (_, entry) in entries {
                        if let Err(error) = entry {
                            prop_assert!(matches!(error, SyncError::InvalidConfig(_)), "{error:?}");
                        }
                    }
                }
                Err(error) => prop_assert!(matches!(error, SyncError::InvalidConfig(_)), "{error:?}"),
            }
        }
    }
}
