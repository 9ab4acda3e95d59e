//! Accounts: stored people with a role and an Argon2id password hash. An account is never
//! deleted, only deactivated. Every change to its password, role or state increments its
//! session version, which ends the tokens issued before.

use crate::core::auth::Role;
use crate::core::db::{Db, each_db};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

/// An account as the API shows it (never with its hash).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub active: bool,
    #[serde(skip)]
    pub session_version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("email: {0}")]
    Email(String),
    #[error("name: is longer than {MAX_NAME} characters")]
    Name,
    #[error("an account with email {0} already exists")]
    Exists(String),
    #[error("account {0} does not exist")]
    NotFound(i64),
    #[error("account {id}: stored row is not valid: {reason}")]
    Corrupt { id: i64, reason: String },
    #[error("accounts: {0}")]
    Database(#[from] sqlx::Error),
}

/// Longest account name, characters.
pub const MAX_NAME: usize = 200;

/// Normalizes and checks an email address: trimmed, lower case, one `@` with text on both sides,
/// no spaces, at most 254 bytes (RFC 5321's path limit).
pub fn normalize_email(raw: &str) -> Result<String, AccountError> {
    let e = raw.trim().to_lowercase();
    if e.is_empty() {
        return Err(AccountError::Email("is empty".into()));
    }
    if e.len() > 254 {
        return Err(AccountError::Email("is longer than 254 bytes".into()));
    }
    if e.chars().any(char::is_whitespace) {
        return Err(AccountError::Email(format!("{e:?} contains a space")));
    }
    match e.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
        {
            Ok(e)
        }
        _ => Err(AccountError::Email(format!(
            "{e:?} is not an address of the form name@domain"
        ))),
    }
}

fn check_name(name: &str) -> Result<(), AccountError> {
    if name.chars().count() > MAX_NAME {
        return Err(AccountError::Name);
    }
    Ok(())
}

const COLUMNS: &str = "id, email, name, role, active, session_version, created_at, updated_at";

macro_rules! user_rows {
    ($rows:expr, $from_row:ident) => {
        $rows
            .iter()
            .map(|r| {
                let id: i64 = r.try_get("id")?;
                let role: String = r.try_get("role")?;
                Ok(User {
                    id,
                    email: r.try_get("email")?,
                    name: r.try_get("name")?,
                    role: role
                        .parse()
                        .map_err(|reason| AccountError::Corrupt { id, reason })?,
                    active: r.try_get("active")?,
                    session_version: r.try_get("session_version")?,
                    created_at: $from_row(r, "created_at")?,
                    updated_at: $from_row(r, "updated_at")?,
                })
            })
            .collect::<Result<Vec<User>, AccountError>>()
    };
}

/// Creates an active account. `password_hash` comes from `core::auth::hash_password`.
pub async fn create(
    db: &Db,
    email: &str,
    name: &str,
    role: Role,
    password_hash: &str,
) -> Result<User, AccountError> {
    let email = normalize_email(email)?;
    check_name(name)?;
    let now = Utc::now();
    let id: Option<i64> = each_db!(db, |p, to_db, _from| {
        sqlx::query_scalar(
            "INSERT INTO users (email, name, role, password_hash, active, session_version, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, TRUE, 1, $5, $5) \
             ON CONFLICT (email) DO NOTHING RETURNING id",
        )
        .bind(&email)
        .bind(name)
        .bind(role.as_str())
        .bind(password_hash)
        .bind(to_db(now))
        .fetch_optional(p)
        .await?
    });
    let id = id.ok_or(AccountError::Exists(email))?;
    get(db, id).await?.ok_or(AccountError::NotFound(id))
}

/// One account by id.
pub async fn get(db: &Db, id: i64) -> Result<Option<User>, AccountError> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE id = $1");
    let mut v = each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_all(p)
            .await?;
        user_rows!(rows, from_row)?
    });
    Ok(v.pop())
}

/// One account by email (normalized), with its password hash.
pub async fn by_email(db: &Db, email: &str) -> Result<Option<(User, String)>, AccountError> {
    let Ok(email) = normalize_email(email) else {
        return Ok(None);
    };
    let sql = format!("SELECT {COLUMNS}, password_hash FROM users WHERE email = $1");
    each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&email)
            .fetch_all(p)
            .await?;
        let hash: Option<String> = rows
            .first()
            .map(|r| r.try_get("password_hash"))
            .transpose()?;
        let mut users = user_rows!(rows, from_row)?;
        Ok(users.pop().zip(hash))
    })
}

/// Every account, by id.
pub async fn list(db: &Db) -> Result<Vec<User>, AccountError> {
    let sql = format!("SELECT {COLUMNS} FROM users ORDER BY id");
    each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(p).await?;
        user_rows!(rows, from_row)
    })
}

/// A change to an account; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub name: Option<String>,
    pub role: Option<Role>,
    pub active: Option<bool>,
    pub password_hash: Option<String>,
}

impl Change {
    /// Whether the change ends the account's current sessions.
    fn ends_sessions(&self, before: &User) -> bool {
        self.password_hash.is_some()
            || self.role.is_some_and(|r| r != before.role)
            || self.active.is_some_and(|a| a != before.active)
    }
}

/// Applies `change` to account `id`; returns the account as stored afterwards.
pub async fn update(db: &Db, id: i64, change: &Change) -> Result<User, AccountError> {
    let before = get(db, id).await?.ok_or(AccountError::NotFound(id))?;
    if let Some(n) = &change.name {
        check_name(n)?;
    }
    let bump = i64::from(change.ends_sessions(&before));
    let now = Utc::now();
    each_db!(db, |p, to_db, _from| {
        sqlx::query(
            "UPDATE users SET name = COALESCE($2, name), role = COALESCE($3, role), \
             active = COALESCE($4, active), password_hash = COALESCE($5, password_hash), \
             session_version = session_version + $6, updated_at = $7 WHERE id = $1",
        )
        .bind(id)
        .bind(change.name.as_deref())
        .bind(change.role.map(Role::as_str))
        .bind(change.active)
        .bind(change.password_hash.as_deref())
        .bind(bump)
        .bind(to_db(now))
        .execute(p)
        .await?;
    });
    get(db, id).await?.ok_or(AccountError::NotFound(id))
}

/// Active accounts with the admin role.
pub async fn active_admins(db: &Db) -> Result<i64, AccountError> {
    Ok(each_db!(db, |p, _to, _from| {
        sqlx::query_scalar("SELECT count(*) FROM users WHERE role = 'admin' AND active = TRUE")
            .fetch_one(p)
            .await?
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(
            normalize_email("  Ana.Perez@Agua.CL ").expect("valid"),
            "ana.perez@agua.cl"
        );
        for bad in ["", "ana", "@agua.cl", "ana@", "ana perez@agua.cl", "a@b@c"] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
    }
}
