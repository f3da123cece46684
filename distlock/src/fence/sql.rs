//! Fenced writes to PostgreSQL, through `sqlx` (feature `postgres`).
//!
//! **Token columns must be `BIGINT`.** Tokens start near 1.8·10^15 (the lock
//! server's clock in microseconds): an `INTEGER` column overflows on the first
//! write. Bind a token with [`FencingToken::to_bigint`], which refuses (never
//! wraps) a token above `i64::MAX`.
//!
//! Two forms; use either or both.
//!
//! # The highest token per resource, checked in your transaction
//!
//! A table keeps the highest token each resource has seen (create it once with
//! [`create_table`], or with [`CREATE_TABLE`] in your migrations). At the start
//! of the transaction that writes, [`advance`] checks the token and raises
//! the resource's highest one; it fails with [`Error::Stale`] if a newer holder
//! has been there, and the transaction is rolled back when you return the
//! error. Its row stays locked until the transaction ends, so fenced writers of
//! one resource commit one after the other, in token order: the writes in the
//! transaction can be anything, on any tables.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, guard: distlock::LockGuard) -> Result<(), distlock::Error> {
//! use distlock::fence::sql;
//!
//! let mut tx = pool.begin().await?;
//! sql::advance(&mut tx, "order:42", &guard).await?; // Err(Stale) if a newer holder wrote
//! sqlx::query("UPDATE orders SET status = 'paid' WHERE id = 42")
//!     .execute(&mut *tx)
//!     .await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! # A token column on your own rows
//!
//! Without the extra table: give the rows a `fence BIGINT NOT NULL` column
//! and make each write conditional on it. An equal token passes (a holder
//! writes many times):
//!
//! ```sql
//! -- update: 0 rows when the token is stale (or when the row does not exist)
//! UPDATE orders SET status = $1, fence = $2 WHERE id = $3 AND fence <= $2;
//!
//! -- insert or update: 0 rows only when the token is stale
//! INSERT INTO orders AS o (id, status, fence) VALUES ($1, $2, $3)
//! ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, fence = EXCLUDED.fence
//! WHERE o.fence <= EXCLUDED.fence;
//! ```
//!
//! [`require_written`] turns "0 rows" into [`Error::Stale`]:
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, token: u64) -> Result<(), distlock::Error> {
//! use distlock::fence::{sql, FencingToken};
//!
//! let token = FencingToken::from(token);
//! let done = sqlx::query(
//!     "INSERT INTO orders AS o (id, status, fence) VALUES ($1, $2, $3) \
//!      ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, fence = EXCLUDED.fence \
//!      WHERE o.fence <= EXCLUDED.fence",
//! )
//! .bind(42_i64)
//! .bind("paid")
//! .bind(token.to_bigint()?)
//! .execute(&pool)
//! .await?;
//! sql::require_written(&done, "order:42", token)?;
//! # Ok(()) }
//! ```

use sqlx::postgres::{PgConnection, PgQueryResult};
use sqlx::{Connection, PgExecutor};

use super::FencingToken;
use crate::error::{shorten, Error, Result};
use crate::key::MAX_KEY_LEN;

/// The table [`advance`] uses: the highest token of each resource.
pub const TABLE: &str = "distlock_fences";

/// Creates [`TABLE`] if it does not exist. The token column is `BIGINT`.
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS distlock_fences (\
     resource TEXT PRIMARY KEY, \
     token BIGINT NOT NULL)";

/// Checks the token and raises the resource's highest one, in one statement:
/// the row ends up with the larger of the two, and the statement returns it.
const ADVANCE: &str = "INSERT INTO distlock_fences AS f (resource, token) VALUES ($1, $2) \
     ON CONFLICT (resource) DO UPDATE SET token = GREATEST(f.token, EXCLUDED.token) \
     RETURNING token";

const HIGHEST: &str = "SELECT token FROM distlock_fences WHERE resource = $1";

/// Runs [`CREATE_TABLE`].
///
/// # Errors
///
/// [`Error::Database`] from the database.
///
/// # Cancel safety
///
/// The statement is idempotent: run it again if this future was dropped.
pub async fn create_table<'c>(conn: impl PgExecutor<'c>) -> Result<()> {
    sqlx::query(CREATE_TABLE).execute(conn).await?;
    Ok(())
}

/// Checks `token` against the highest token `resource` has seen and records
/// it, inside the caller's transaction; call it before the transaction's
/// writes. The resource's row in [`TABLE`] stays locked until the transaction
/// ends, so concurrent fenced transactions on one resource commit one after
/// the other.
///
/// `conn` is the transaction: pass `&mut tx` (or `&mut *tx`) for a
/// `sqlx::Transaction` from `pool.begin()`.
///
/// # Errors
///
/// - [`Error::Stale`] if `resource` has seen a newer token: return it (so the
///   transaction is rolled back) and do not write.
/// - [`Error::Config`] if `conn` is not in a transaction begun through `sqlx`
///   (the check would then not cover the writes), or the token does not fit a
///   `BIGINT`; [`Error::InvalidKey`] for an empty, over-long or NUL-containing
///   resource name.
/// - [`Error::Database`] from the database (e.g. [`TABLE`] does not exist).
///
/// # Cancel safety
///
/// Dropping the future leaves the transaction in an unknown state: roll it
/// back (dropping the transaction does).
pub async fn advance(
    conn: &mut PgConnection,
    resource: &str,
    token: impl Into<FencingToken>,
) -> Result<()> {
    let token = token.into();
    validate_resource(resource)?;
    let bigint = token.to_bigint()?;
    if !conn.is_in_transaction() {
        return Err(Error::config(
            "fence::sql::advance must run inside the transaction that writes (pool.begin())",
        ));
    }
    let highest: i64 = sqlx::query_scalar(ADVANCE)
        .bind(resource)
        .bind(bigint)
        .fetch_one(&mut *conn)
        .await?;
    if highest > bigint {
        return Err(Error::Stale {
            resource: shorten(resource),
            offered: token.get(),
            seen: u64::try_from(highest).ok(),
        });
    }
    Ok(())
}

/// The highest token `resource` has seen in [`TABLE`], if any.
///
/// # Errors
///
/// [`Error::InvalidKey`] for a bad resource name, [`Error::Database`] from the
/// database.
///
/// # Cancel safety
///
/// Read-only: dropping it leaves nothing behind.
pub async fn highest<'c>(
    conn: impl PgExecutor<'c>,
    resource: &str,
) -> Result<Option<FencingToken>> {
    validate_resource(resource)?;
    let token: Option<i64> = sqlx::query_scalar(HIGHEST)
        .bind(resource)
        .fetch_optional(conn)
        .await?;
    Ok(token
        .and_then(|t| u64::try_from(t).ok())
        .map(FencingToken::new))
}

/// [`Error::Stale`] if a fenced statement of the token-column form wrote no
/// row. With the insert-or-update form that can only mean a stale token; with
/// a plain `UPDATE` it can also mean the row does not exist.
///
/// # Errors
///
/// [`Error::Stale`] (without the seen token, which the statement does not
/// return) when `result` affected no row.
pub fn require_written(
    result: &PgQueryResult,
    resource: &str,
    token: impl Into<FencingToken>,
) -> Result<()> {
    if result.rows_affected() > 0 {
        return Ok(());
    }
    Err(Error::Stale {
        resource: shorten(resource),
        offered: token.into().get(),
        seen: None,
    })
}

fn validate_resource(resource: &str) -> Result<()> {
    if resource.is_empty() {
        return Err(Error::invalid_key(resource, "the resource name is empty"));
    }
    if resource.len() > MAX_KEY_LEN {
        return Err(Error::invalid_key(
            resource,
            "the resource name is longer than 1024 bytes",
        ));
    }
    if resource.contains('\0') {
        return Err(Error::invalid_key(
            resource,
            "the resource name contains a NUL byte, which PostgreSQL text cannot hold",
        ));
    }
    Ok(())
}
