//! The SQLite state store (WAL mode): the embedded default.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use secrecy::ExposeSecret;
use tributary_sdk::{
    Contribution, Cursor, PlatformRollup, Quarantined, Rollup, StoredToken, TokenStore, TokenStoreError,
};

use super::{
    AlertOutcome, Claimed, CommitStats, DeadLetter, Delivery, Erased, Finished, PendingAlert, Profile, Review,
    SourceState, StateError, StateStore, Totals,
};

/// Versioned schema: each entry runs once, in order, in a transaction.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "
    CREATE TABLE cursors (
        source TEXT PRIMARY KEY,
        cursor TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE ledger (
        key TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        first_seen INTEGER NOT NULL,
        last_changed INTEGER NOT NULL
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL,
        source TEXT NOT NULL,
        payload TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        lease_owner TEXT,
        lease_until INTEGER,
        last_error TEXT,
        contact_id TEXT,
        activity_id TEXT,
        created_at INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE INDEX outbox_due ON outbox (status, next_attempt_at);
    CREATE UNIQUE INDEX outbox_one_pending_per_key ON outbox (key) WHERE status = 'pending';
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        source TEXT NOT NULL,
        external_id TEXT,
        reason TEXT NOT NULL,
        raw TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE TABLE identities (
        identity TEXT PRIMARY KEY,
        contact_id TEXT NOT NULL,
        via TEXT NOT NULL,
        linked_at INTEGER NOT NULL
    );
    CREATE TABLE activities (
        key TEXT PRIMARY KEY,
        contact_id TEXT NOT NULL,
        activity_id TEXT NOT NULL,
        platform TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        sentiment REAL,
        intent TEXT
    );
    CREATE INDEX activities_by_contact ON activities (contact_id);
    CREATE TABLE rollups_due (
        contact_id TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        until INTEGER NOT NULL
    );
    CREATE TABLE source_polls (
        source TEXT PRIMARY KEY,
        last_poll_at INTEGER,
        last_success_at INTEGER,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        newest_item_at INTEGER
    );
    ",
    // 2: a malformed item seen again (a rescanned page) is kept once, with
    // the time it was last seen.
    "
    ALTER TABLE quarantine ADD COLUMN fingerprint TEXT;
    UPDATE quarantine SET fingerprint = 'legacy-' || id;
    CREATE UNIQUE INDEX quarantine_once ON quarantine (source, fingerprint);
    ",
    // 3: activities know their source, so delivered counts survive the
    // pruning of old outbox rows.
    "
    ALTER TABLE activities ADD COLUMN source TEXT;
    UPDATE activities SET source = (SELECT source FROM ledger WHERE ledger.key = activities.key);
    CREATE INDEX activities_by_source ON activities (source);
    CREATE INDEX outbox_finished ON outbox (status, finished_at);
    CREATE INDEX outbox_by_source ON outbox (source, status);
    ",
    // 4: OAuth2 tokens outlive a restart (the database file is 0600); a
    // backfill (`sync --since`) keeps its own cursor beside the live one;
    // activities of deleted contributions leave the rollups.
    "
    CREATE TABLE oauth_tokens (
        key TEXT PRIMARY KEY,
        access_token TEXT NOT NULL,
        refresh_token TEXT,
        expires_at INTEGER,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE backfill_cursors (
        source TEXT PRIMARY KEY,
        since INTEGER,
        cursor TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    ALTER TABLE activities ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
    ",
    // 5: the social customer record. Every platform identity seen, the
    // review queue of weak matches, the digests of forgotten people, the
    // alert outbox, and what the per-platform and 90-day rollups read.
    "
    CREATE TABLE profiles (
        identity TEXT PRIMARY KEY,
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        handle TEXT,
        display_name TEXT,
        email TEXT,
        profile_url TEXT,
        links TEXT,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    );
    CREATE INDEX profiles_by_email ON profiles (email);
    CREATE INDEX profiles_by_name ON profiles (lower(display_name));
    CREATE INDEX profiles_by_handle ON profiles (platform, lower(handle));
    CREATE TABLE identity_reviews (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        identity_a TEXT NOT NULL,
        identity_b TEXT NOT NULL,
        evidence TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        created_at INTEGER NOT NULL,
        decided_at INTEGER,
        UNIQUE (identity_a, identity_b)
    );
    CREATE TABLE forgotten (
        digest TEXT PRIMARY KEY,
        at INTEGER NOT NULL
    );
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rule TEXT NOT NULL,
        key TEXT NOT NULL,
        contact_id TEXT,
        payload TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_error TEXT,
        created_at INTEGER NOT NULL,
        sent_at INTEGER,
        UNIQUE (rule, key)
    );
    CREATE INDEX alerts_due ON alerts (status, next_attempt_at);
    ALTER TABLE activities ADD COLUMN identity TEXT;
    ALTER TABLE activities ADD COLUMN url TEXT;
    ALTER TABLE activities ADD COLUMN excerpt TEXT;
    ALTER TABLE activities ADD COLUMN resolved INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX activities_by_identity ON activities (identity);
    ",
];

/// Where a committed page moves its cursor.
enum Slot {
    Live(Option<Cursor>),
    Backfill { since: Option<DateTime<Utc>>, cursor: Option<Cursor> },
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StateError::Other(format!("cannot create {}: {e}", dir.display())))?;
        }
        restrict_to_owner(path)?;
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // In WAL mode NORMAL survives any process crash; a power loss may
        // drop the last transactions, cursor included, never half of one.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(SqliteStore { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn commit(
        &self,
        source: &str,
        contributions: Vec<Contribution>,
        quarantined: Vec<Quarantined>,
        slot: Slot,
    ) -> Result<CommitStats, StateError> {
        let source = source.to_owned();
        self.with(move |conn| {
            let now = now_ms();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut stats = CommitStats::default();
            let mut newest: Option<i64> = None;
            for contribution in &contributions {
                newest = newest.max(Some(contribution.created_at.timestamp_millis()));
                match store_contribution(&tx, &source, contribution, now)? {
                    Stored::Unchanged => stats.unchanged += 1,
                    Stored::New => stats.new += 1,
                    Stored::Updated => stats.updated += 1,
                    Stored::Forgotten => stats.forgotten += 1,
                }
            }
            for item in &quarantined {
                let fingerprint = tributary_sdk::model::short_hash(&format!(
                    "{}\u{0}{}\u{0}{}",
                    item.external_id.as_deref().unwrap_or(""),
                    item.reason,
                    item.raw
                ));
                tx.execute(
                    "INSERT INTO quarantine (source, external_id, reason, raw, at, fingerprint) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (source, fingerprint) DO UPDATE SET at = excluded.at",
                    params![source, item.external_id, item.reason, item.raw, now, fingerprint],
                )?;
                stats.quarantined += 1;
            }
            match slot {
                Slot::Live(Some(cursor)) => {
                    tx.execute(
                        "INSERT INTO cursors (source, cursor, updated_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (source) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
                        params![source, cursor.0, now],
                    )?;
                }
                Slot::Backfill { since, cursor: Some(cursor) } => {
                    tx.execute(
                        "INSERT INTO backfill_cursors (source, since, cursor, updated_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (source) DO UPDATE
                         SET since = excluded.since, cursor = excluded.cursor, updated_at = excluded.updated_at",
                        params![source, since.map(|s| s.timestamp_millis()), cursor.0, now],
                    )?;
                }
                Slot::Live(None) | Slot::Backfill { cursor: None, .. } => {}
            }
            if let Some(newest) = newest {
                tx.execute(
                    "INSERT INTO source_polls (source, newest_item_at) VALUES (?1, ?2)
                     ON CONFLICT (source) DO UPDATE SET newest_item_at = MAX(COALESCE(newest_item_at, 0), excluded.newest_item_at)",
                    params![source, newest],
                )?;
            }
            tx.commit()?;
            Ok(stats)
        })
        .await
    }

    async fn with<T, F>(&self, work: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StateError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut conn)
        })
        .await
        .map_err(|e| StateError::Other(format!("state task failed: {e}")))?
    }
}

/// The database holds OAuth2 tokens: it is created readable by its owner
/// only (SQLite gives its -wal and -shm files the same mode), and an older
/// one is tightened.
fn restrict_to_owner(path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let failed = |e: std::io::Error| StateError::Other(format!("cannot open {}: {e}", path.display()));
    let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(failed)?;
    let mode = file.metadata().map_err(failed)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "state store readable by others; restricting it to its owner");
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StateError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL);",
    )?;
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let version = index as i64 + 1;
        // Decided inside the write transaction: two processes starting at
        // once apply each migration once.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let applied: i64 = tx.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0))?;
        if version <= applied {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)", params![version, now_ms()])?;
        tx.commit()?;
        tracing::info!(version, "state schema migrated");
    }
    Ok(())
}

fn in_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// How one contribution of a committed page was stored.
enum Stored {
    Unchanged,
    New,
    Updated,
    /// Its author was forgotten: dropped, no trace kept.
    Forgotten,
}

fn is_forgotten(tx: &Transaction<'_>, contribution: &Contribution) -> Result<bool, StateError> {
    let mut digests = vec![super::forgotten_digest("identity", &contribution.identity_key())];
    if let Some(email) = contribution.author.email.as_deref().filter(|e| !e.trim().is_empty()) {
        digests.push(super::forgotten_digest("email", email));
    }
    let mut query = tx.prepare_cached("SELECT 1 FROM forgotten WHERE digest = ?1")?;
    for digest in digests {
        if query.exists([digest])? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Keeps what the platform says of the author: the identity graph's nodes.
fn record_profile(tx: &Transaction<'_>, contribution: &Contribution) -> Result<(), StateError> {
    let author = &contribution.author;
    if author.id.trim().is_empty() {
        return Ok(());
    }
    let seen = contribution.created_at.timestamp_millis();
    let email = author.email.as_deref().map(|e| e.trim().to_lowercase()).filter(|e| !e.is_empty());
    let links = match author.links.is_empty() {
        true => None,
        false => Some(serde_json::to_string(&author.links).map_err(|e| StateError::Other(e.to_string()))?),
    };
    tx.prepare_cached(
        "INSERT INTO profiles (identity, platform, user_id, handle, display_name, email, profile_url, links, first_seen, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
         ON CONFLICT (identity) DO UPDATE SET
           handle = COALESCE(excluded.handle, handle), display_name = COALESCE(excluded.display_name, display_name),
           email = COALESCE(excluded.email, email), profile_url = COALESCE(excluded.profile_url, profile_url),
           links = COALESCE(excluded.links, links),
           first_seen = MIN(first_seen, excluded.first_seen), last_seen = MAX(last_seen, excluded.last_seen)",
    )?
    .execute(params![
        contribution.identity_key(),
        contribution.platform,
        author.id,
        author.handle,
        author.display_name,
        email,
        author.profile_url,
        links,
        seen
    ])?;
    Ok(())
}

fn store_contribution(
    tx: &Transaction<'_>,
    source: &str,
    contribution: &Contribution,
    now: i64,
) -> Result<Stored, StateError> {
    if is_forgotten(tx, contribution)? {
        return Ok(Stored::Forgotten);
    }
    let key = contribution.key();
    let hash = contribution.content_hash();
    let known: Option<String> =
        tx.query_row("SELECT content_hash FROM ledger WHERE key = ?1", [&key], |r| r.get(0)).optional()?;
    if known.as_deref() == Some(hash.as_str()) {
        return Ok(Stored::Unchanged);
    }
    record_profile(tx, contribution)?;
    let payload = serde_json::to_string(contribution).map_err(|e| StateError::Other(e.to_string()))?;
    tx.execute(
        "INSERT INTO ledger (key, source, content_hash, first_seen, last_changed) VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT (key) DO UPDATE SET content_hash = excluded.content_hash, last_changed = excluded.last_changed",
        params![key, source, hash, now],
    )?;
    // An edit of a version still waiting replaces it: one pending row per key.
    let replaced = tx.execute(
        "UPDATE outbox SET payload = ?2, content_hash = ?3 WHERE key = ?1 AND status = 'pending'",
        params![key, payload, hash],
    )?;
    if replaced == 0 {
        tx.execute(
            "INSERT INTO outbox (key, source, payload, content_hash, next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![key, source, payload, hash, now],
        )?;
    }
    Ok(if known.is_some() { Stored::Updated } else { Stored::New })
}

/// The start of a contribution's text, for the rollup's last contribution.
fn excerpt(c: &Contribution) -> Option<String> {
    let text = if c.body.trim().is_empty() { c.title.as_deref().unwrap_or("") } else { c.body.as_str() };
    Some(tributary_sdk::text::one_line(text, 200)).filter(|excerpt| !excerpt.is_empty())
}

/// `?, ?, ?` for `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

const PROFILE_COLUMNS: &str = "p.identity, p.platform, p.user_id, p.handle, p.display_name, p.email, p.profile_url,
    p.first_seen, p.last_seen, (SELECT contact_id FROM identities i WHERE i.identity = p.identity), p.links";

fn profile_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Profile> {
    Ok(Profile {
        identity: r.get(0)?,
        platform: r.get(1)?,
        user_id: r.get(2)?,
        handle: r.get(3)?,
        display_name: r.get(4)?,
        email: r.get(5)?,
        profile_url: r.get(6)?,
        first_seen: from_ms(r.get(7)?),
        last_seen: from_ms(r.get(8)?),
        contact_id: r.get(9)?,
        links: r.get::<_, Option<String>>(10)?.and_then(|links| serde_json::from_str(&links).ok()).unwrap_or_default(),
    })
}

fn profile(conn: &Connection, identity: &str) -> Result<Option<Profile>, StateError> {
    Ok(conn
        .query_row(&format!("SELECT {PROFILE_COLUMNS} FROM profiles p WHERE p.identity = ?1"), [identity], profile_row)
        .optional()?)
}

fn review_by_id(conn: &Connection, id: i64) -> Result<Option<Review>, StateError> {
    let row = conn
        .query_row(
            "SELECT id, identity_a, identity_b, evidence, status, created_at FROM identity_reviews WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()?;
    row.map(|row| review_row(conn, row)).transpose()
}

/// Queues the pair for review, in its one order (`a` < `b`); false when it
/// was queued or decided before.
fn queue_review(conn: &Connection, a: &str, b: &str, evidence: &str) -> Result<bool, StateError> {
    let (a, b) = if a < b { (a, b) } else { (b, a) };
    let queued = conn.execute(
        "INSERT INTO identity_reviews (identity_a, identity_b, evidence, created_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (identity_a, identity_b) DO NOTHING",
        params![a, b, evidence, now_ms()],
    )?;
    Ok(queued == 1)
}

/// A profile for an identity the store never saw (an administrator's link).
fn bare_profile(identity: &str) -> Profile {
    let (platform, user_id) = identity.split_once(':').unwrap_or(("", identity));
    Profile {
        identity: identity.to_owned(),
        platform: platform.to_owned(),
        user_id: user_id.to_owned(),
        handle: None,
        display_name: None,
        email: None,
        profile_url: None,
        first_seen: DateTime::<Utc>::default(),
        last_seen: DateTime::<Utc>::default(),
        contact_id: None,
        links: Vec::new(),
    }
}

fn review_row(conn: &Connection, row: (i64, String, String, String, String, i64)) -> Result<Review, StateError> {
    let (id, a, b, evidence, status, created_at) = row;
    Ok(Review {
        id,
        a: profile(conn, &a)?.unwrap_or_else(|| bare_profile(&a)),
        b: profile(conn, &b)?.unwrap_or_else(|| bare_profile(&b)),
        evidence,
        status,
        created_at: from_ms(created_at),
    })
}

/// Lower-case letters and digits only: `Lea_M` and `lea.m` are similar handles.
const SIMILAR_HANDLE_SQL: &str =
    "replace(replace(replace(replace(lower(trim(COALESCE({}, ''), '@')), '_', ''), '-', ''), '.', ''), ' ', '')";

/// The figures of one contact, from its activities (see [`Rollup`]).
struct ActivityRow {
    platform: String,
    created_at: DateTime<Utc>,
    sentiment: Option<f64>,
    intent: Option<String>,
    url: Option<String>,
    excerpt: Option<String>,
    handle: Option<String>,
    profile_url: Option<String>,
}

/// A complaint this recent, with no praise from the person after it, needs attention.
const UNRESOLVED_COMPLAINT_DAYS: i64 = 30;
/// Sentiment of the last week this far below the 90 days before it needs attention.
const SENTIMENT_DROP: f64 = 0.5;

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0u32), |(sum, n), v| (sum + v, n + 1));
    (n > 0).then(|| sum / f64::from(n))
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn compute_rollup(contact_id: String, rows: &[ActivityRow], now: DateTime<Utc>) -> Rollup {
    let mut rollup = Rollup { contact_id, contribution_count: rows.len() as u64, ..Rollup::default() };
    let count = |intent: &str| rows.iter().filter(|r| r.intent.as_deref() == Some(intent)).count() as u64;
    rollup.questions = count("question");
    rollup.complaints = count("complaint");
    rollup.ideas = count("idea");
    rollup.praise = count("praise");
    rollup.sentiment_avg = round3(mean(rows.iter().filter_map(|r| r.sentiment)).unwrap_or(0.0));
    // Rows come oldest first.
    if let Some(last) = rows.last() {
        rollup.last_contribution_at = last.created_at;
        rollup.last_platform = last.platform.clone();
        rollup.last_url = last.url.clone();
        rollup.last_excerpt = last.excerpt.clone();
    }
    let mut platforms: Vec<String> = rows.iter().map(|r| r.platform.clone()).collect();
    platforms.sort();
    platforms.dedup();
    rollup.per_platform = platforms
        .iter()
        .map(|platform| {
            let on: Vec<&ActivityRow> = rows.iter().filter(|r| &r.platform == platform).collect();
            let named = on.iter().rev().find(|r| r.handle.is_some() || r.profile_url.is_some());
            PlatformRollup {
                platform: platform.clone(),
                handle: named.and_then(|r| r.handle.clone()),
                profile_url: named.and_then(|r| r.profile_url.clone()),
                first_seen: on.first().map(|r| r.created_at).unwrap_or_default(),
                last_seen: on.last().map(|r| r.created_at).unwrap_or_default(),
                contributions: on.len() as u64,
            }
        })
        .collect();
    rollup.platforms = platforms;

    let window = now - chrono::Duration::days(90);
    let week = now - chrono::Duration::days(7);
    let recent: Vec<&ActivityRow> = rows.iter().filter(|r| r.created_at >= window).collect();
    rollup.count_90d = recent.len() as u64;
    rollup.sentiment_avg_90d = mean(recent.iter().filter_map(|r| r.sentiment)).map(round3);

    let complaint_cutoff = now - chrono::Duration::days(UNRESOLVED_COMPLAINT_DAYS);
    let last_complaint = rows.iter().rposition(|r| r.intent.as_deref() == Some("complaint"));
    let unresolved = last_complaint.filter(|at| {
        rows[*at].created_at >= complaint_cutoff
            && !rows[at + 1..].iter().any(|r| r.intent.as_deref() == Some("praise"))
    });
    let this_week = mean(recent.iter().filter(|r| r.created_at >= week).filter_map(|r| r.sentiment));
    let this_week_n = recent.iter().filter(|r| r.created_at >= week && r.sentiment.is_some()).count();
    let before = mean(recent.iter().filter(|r| r.created_at < week).filter_map(|r| r.sentiment));
    let before_n = recent.iter().filter(|r| r.created_at < week && r.sentiment.is_some()).count();
    if let Some(at) = unresolved {
        rollup.needs_attention = true;
        rollup.attention_reason =
            Some(format!("unresolved complaint on {} ({})", rows[at].platform, rows[at].created_at.format("%Y-%m-%d")));
    } else if let (Some(now_avg), Some(before_avg)) = (this_week, before)
        && this_week_n >= 2
        && before_n >= 3
        && before_avg - now_avg >= SENTIMENT_DROP
    {
        rollup.needs_attention = true;
        rollup.attention_reason =
            Some(format!("sentiment fell from {before_avg:.2} to {now_avg:.2} in the last 7 days"));
    }
    rollup
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn load_token(&self, key: &str) -> Result<Option<StoredToken>, TokenStoreError> {
        let key = key.to_owned();
        self.with(move |conn| {
            let row: Option<(String, Option<String>, Option<i64>)> = conn
                .query_row(
                    "SELECT access_token, refresh_token, expires_at FROM oauth_tokens WHERE key = ?1",
                    [&key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            Ok(row.map(|(access, refresh, expires_at)| StoredToken {
                access_token: access.into(),
                refresh_token: refresh.map(Into::into),
                expires_at: expires_at.map(from_ms),
            }))
        })
        .await
        .map_err(|error| TokenStoreError(error.to_string()))
    }

    async fn save_token(&self, key: &str, token: &StoredToken) -> Result<(), TokenStoreError> {
        let key = key.to_owned();
        let access = token.access_token.expose_secret().to_owned();
        let refresh = token.refresh_token.as_ref().map(|t| t.expose_secret().to_owned());
        let expires_at = token.expires_at.map(|at| at.timestamp_millis());
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO oauth_tokens (key, access_token, refresh_token, expires_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO UPDATE SET access_token = excluded.access_token,
                   refresh_token = excluded.refresh_token, expires_at = excluded.expires_at,
                   updated_at = excluded.updated_at",
                params![key, access, refresh, expires_at, now_ms()],
            )?;
            Ok(())
        })
        .await
        .map_err(|error| TokenStoreError(error.to_string()))
    }
}

#[async_trait]
impl StateStore for SqliteStore {
    async fn ping(&self) -> Result<(), StateError> {
        self.with(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?)).await
    }

    async fn cursor(&self, source: &str) -> Result<Option<Cursor>, StateError> {
        let source = source.to_owned();
        self.with(move |conn| {
            let cursor: Option<String> =
                conn.query_row("SELECT cursor FROM cursors WHERE source = ?1", [&source], |r| r.get(0)).optional()?;
            Ok(cursor.map(Cursor))
        })
        .await
    }

    async fn commit_page(
        &self,
        source: &str,
        contributions: Vec<Contribution>,
        quarantined: Vec<Quarantined>,
        cursor: Option<Cursor>,
    ) -> Result<CommitStats, StateError> {
        self.commit(source, contributions, quarantined, Slot::Live(cursor)).await
    }

    async fn backfill_cursor(&self, source: &str, since: Option<DateTime<Utc>>) -> Result<Option<Cursor>, StateError> {
        let source = source.to_owned();
        self.with(move |conn| {
            let cursor: Option<String> = conn
                .query_row(
                    "SELECT cursor FROM backfill_cursors WHERE source = ?1 AND since IS ?2",
                    params![source, since.map(|s| s.timestamp_millis())],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(cursor.map(Cursor))
        })
        .await
    }

    async fn commit_backfill_page(
        &self,
        source: &str,
        contributions: Vec<Contribution>,
        quarantined: Vec<Quarantined>,
        since: Option<DateTime<Utc>>,
        cursor: Option<Cursor>,
    ) -> Result<CommitStats, StateError> {
        self.commit(source, contributions, quarantined, Slot::Backfill { since, cursor }).await
    }

    async fn claim(&self, owner: &str, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StateError> {
        let owner = owner.to_owned();
        self.with(move |conn| {
            let now = now_ms();
            let until = now + lease.as_millis() as i64;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut claimed = Vec::new();
            {
                let mut statement = tx.prepare(
                    "UPDATE outbox SET lease_owner = ?1, lease_until = ?2
                     WHERE id IN (
                        SELECT id FROM outbox
                        WHERE status = 'pending' AND next_attempt_at <= ?3
                          AND (lease_until IS NULL OR lease_until < ?3)
                        ORDER BY id LIMIT ?4)
                     RETURNING id, content_hash, attempts, payload",
                )?;
                let rows = statement.query_map(params![owner, until, now, limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, u32>(2)?, r.get::<_, String>(3)?))
                })?;
                for row in rows {
                    let (id, content_hash, attempts, payload) = row?;
                    match serde_json::from_str::<Contribution>(&payload) {
                        Ok(contribution) => claimed.push(Claimed { id, content_hash, attempts, contribution }),
                        Err(error) => {
                            // Written by an incompatible version: keep it, visibly.
                            tx.execute(
                                "UPDATE outbox SET status = 'dead', last_error = ?2, finished_at = ?3 WHERE id = ?1",
                                params![id, format!("unreadable outbox payload: {error}"), now],
                            )?;
                        }
                    }
                }
            }
            tx.commit()?;
            claimed.sort_by_key(|c| c.id);
            Ok(claimed)
        })
        .await
    }

    async fn renew_claims(&self, owner: &str, lease: Duration) -> Result<(), StateError> {
        let owner = owner.to_owned();
        self.with(move |conn| {
            let until = now_ms() + lease.as_millis() as i64;
            conn.execute(
                "UPDATE outbox SET lease_until = ?2 WHERE lease_owner = ?1 AND status = 'pending'",
                params![owner, until],
            )?;
            Ok(())
        })
        .await
    }

    async fn finish(&self, owner: &str, finished: Vec<Finished>) -> Result<(), StateError> {
        let owner = owner.to_owned();
        self.with(move |conn| {
            let now = now_ms();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for item in &finished {
                // Only the lease holder finishes a row, and only the version it delivered.
                let guard = "WHERE id = ?1 AND lease_owner = ?2 AND content_hash = ?3";
                match &item.delivery {
                    Delivery::Delivered { contact_id, activity_id } => {
                        let changed = tx.execute(
                            &format!(
                                "UPDATE outbox SET status = 'delivered', contact_id = ?4, activity_id = ?5, finished_at = ?6,
                                 lease_owner = NULL, lease_until = NULL, attempts = attempts + 1 {guard}"
                            ),
                            params![item.id, owner, item.content_hash, contact_id, activity_id, now],
                        )?;
                        if changed == 0 {
                            // An edit replaced this version meanwhile: it goes out on its own.
                            tx.execute(
                                "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE id = ?1 AND lease_owner = ?2",
                                params![item.id, owner],
                            )?;
                        }
                        let c = &item.contribution;
                        tx.execute(
                            "INSERT INTO activities (key, contact_id, activity_id, platform, created_at, sentiment, intent, source,
                               deleted, identity, url, excerpt)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                             ON CONFLICT (key) DO UPDATE SET contact_id = excluded.contact_id, activity_id = excluded.activity_id,
                               platform = excluded.platform, created_at = excluded.created_at,
                               sentiment = excluded.sentiment, intent = excluded.intent, source = excluded.source,
                               deleted = excluded.deleted, identity = excluded.identity, url = excluded.url,
                               excerpt = excluded.excerpt",
                            params![
                                c.key(),
                                contact_id,
                                activity_id,
                                c.platform,
                                c.created_at.timestamp_millis(),
                                c.signals.as_ref().and_then(|s| s.scored_sentiment()),
                                c.signals.as_ref().map(|s| s.intent.as_str()),
                                c.source,
                                c.deleted,
                                c.identity_key(),
                                c.url,
                                excerpt(c),
                            ],
                        )?;
                        tx.execute(
                            "INSERT INTO rollups_due (contact_id, version) VALUES (?1, 1)
                             ON CONFLICT (contact_id) DO UPDATE SET version = version + 1",
                            [contact_id],
                        )?;
                    }
                    Delivery::Retry { error, at, counts } => {
                        tx.execute(
                            &format!(
                                "UPDATE outbox SET attempts = attempts + ?6, last_error = ?4, next_attempt_at = ?5,
                                 lease_owner = NULL, lease_until = NULL {guard}"
                            ),
                            params![item.id, owner, item.content_hash, error, at.timestamp_millis(), i64::from(*counts)],
                        )?;
                    }
                    Delivery::Dead { error } => {
                        tx.execute(
                            &format!(
                                "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_error = ?4, finished_at = ?5,
                                 lease_owner = NULL, lease_until = NULL {guard}"
                            ),
                            params![item.id, owner, item.content_hash, error, now],
                        )?;
                    }
                    Delivery::Skipped { reason } => {
                        tx.execute(
                            &format!(
                                "UPDATE outbox SET status = 'skipped', last_error = ?4, finished_at = ?5,
                                 lease_owner = NULL, lease_until = NULL {guard}"
                            ),
                            params![item.id, owner, item.content_hash, reason, now],
                        )?;
                    }
                }
                // Whatever happened, a row this owner still leases is released.
                tx.execute(
                    "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE id = ?1 AND lease_owner = ?2",
                    params![item.id, owner],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn delivered_activities(&self, keys: &[String]) -> Result<HashMap<String, (String, String)>, StateError> {
        let keys = keys.to_vec();
        self.with(move |conn| {
            let mut query = conn.prepare_cached("SELECT contact_id, activity_id FROM activities WHERE key = ?1")?;
            let mut found = HashMap::new();
            for key in keys {
                if let Some(ids) = query.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?))).optional()? {
                    found.insert(key, ids);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn identity(&self, identity: &str) -> Result<Option<String>, StateError> {
        let identity = identity.to_owned();
        self.with(move |conn| {
            Ok(conn
                .query_row("SELECT contact_id FROM identities WHERE identity = ?1", [&identity], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn link_identity(&self, identity: &str, contact_id: &str, via: &str) -> Result<(), StateError> {
        let (identity, contact_id, via) = (identity.to_owned(), contact_id.to_owned(), via.to_owned());
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO identities (identity, contact_id, via, linked_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (identity) DO UPDATE SET contact_id = excluded.contact_id, via = excluded.via, linked_at = excluded.linked_at",
                params![identity, contact_id, via, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    async fn pending_rollups(&self, limit: usize, now: DateTime<Utc>) -> Result<Vec<Rollup>, StateError> {
        self.with(move |conn| {
            let mut due = conn.prepare("SELECT contact_id FROM rollups_due ORDER BY contact_id LIMIT ?1")?;
            let contacts: Vec<String> = due.query_map([limit as i64], |r| r.get(0))?.collect::<Result<_, _>>()?;
            let mut activities = conn.prepare(
                "SELECT a.platform, a.created_at, a.sentiment, a.intent, a.url, a.excerpt, p.handle, p.profile_url
                 FROM activities a LEFT JOIN profiles p ON p.identity = a.identity
                 WHERE a.contact_id = ?1 AND a.deleted = 0 ORDER BY a.created_at, a.key",
            )?;
            let mut rollups = Vec::with_capacity(contacts.len());
            for contact_id in contacts {
                let rows: Vec<ActivityRow> = activities
                    .query_map([&contact_id], |r| {
                        Ok(ActivityRow {
                            platform: r.get(0)?,
                            created_at: from_ms(r.get(1)?),
                            sentiment: r.get(2)?,
                            intent: r.get(3)?,
                            url: r.get(4)?,
                            excerpt: r.get(5)?,
                            handle: r.get(6)?,
                            profile_url: r.get(7)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                rollups.push(compute_rollup(contact_id, &rows, now));
            }
            Ok(rollups)
        })
        .await
    }

    async fn refresh_rollups(&self, since: DateTime<Utc>) -> Result<u64, StateError> {
        self.with(move |conn| {
            let due = conn.execute(
                "INSERT INTO rollups_due (contact_id, version)
                 SELECT DISTINCT contact_id, 1 FROM activities WHERE created_at >= ?1 AND deleted = 0 AND true
                 ON CONFLICT (contact_id) DO UPDATE SET version = version + 1",
                [since.timestamp_millis()],
            )?;
            Ok(due as u64)
        })
        .await
    }

    async fn rollups_written(&self, rollups: &[Rollup]) -> Result<(), StateError> {
        let written: Vec<(String, u64)> =
            rollups.iter().map(|r| (r.contact_id.clone(), r.contribution_count)).collect();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (contact_id, count) in &written {
                // Still due if an activity landed after the figures were taken.
                tx.execute(
                    "DELETE FROM rollups_due WHERE contact_id = ?1
                     AND (SELECT COUNT(*) FROM activities WHERE contact_id = ?1 AND deleted = 0) = ?2",
                    params![contact_id, *count as i64],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn forget_contact(&self, contact_id: &str) -> Result<(), StateError> {
        let contact_id = contact_id.to_owned();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM rollups_due WHERE contact_id = ?1", [&contact_id])?;
            tx.execute("DELETE FROM identities WHERE contact_id = ?1", [&contact_id])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn find_profiles(&self, platform: &str, id_or_handle: &str) -> Result<Vec<Profile>, StateError> {
        let platform = platform.to_owned();
        let wanted = id_or_handle.trim().to_owned();
        let handle = super::bare_handle(&wanted).to_owned();
        self.with(move |conn| {
            let mut query = conn.prepare(&format!(
                "SELECT {PROFILE_COLUMNS} FROM profiles p
                 WHERE p.platform = ?1 AND (p.user_id = ?2 OR lower(p.handle) = lower(?3)
                   OR lower(trim(p.handle, '@')) = lower(?3))
                 ORDER BY p.identity"
            ))?;
            let found = query.query_map(params![platform, wanted, handle], profile_row)?.collect::<Result<_, _>>()?;
            Ok(found)
        })
        .await
    }

    async fn profiles_linking_to(&self, account: &str) -> Result<Vec<Profile>, StateError> {
        let account = account.trim().to_lowercase();
        self.with(move |conn| {
            let mut query = conn.prepare(&format!(
                "SELECT {PROFILE_COLUMNS} FROM profiles p
                 WHERE p.links IS NOT NULL AND EXISTS (SELECT 1 FROM json_each(p.links) l WHERE lower(l.value) = ?1)
                 ORDER BY p.identity"
            ))?;
            let found = query.query_map([account], profile_row)?.collect::<Result<_, _>>()?;
            Ok(found)
        })
        .await
    }

    async fn profiles_by_email(&self, email: &str) -> Result<Vec<Profile>, StateError> {
        let email = email.trim().to_lowercase();
        self.with(move |conn| {
            let mut query = conn
                .prepare(&format!("SELECT {PROFILE_COLUMNS} FROM profiles p WHERE p.email = ?1 ORDER BY p.identity"))?;
            let found = query.query_map([email], profile_row)?.collect::<Result<_, _>>()?;
            Ok(found)
        })
        .await
    }

    async fn profiles_of_contact(&self, contact_id: &str) -> Result<Vec<Profile>, StateError> {
        let contact_id = contact_id.to_owned();
        self.with(move |conn| {
            let mut query = conn.prepare(&format!(
                "SELECT {PROFILE_COLUMNS} FROM profiles p
                 WHERE p.identity IN (SELECT identity FROM identities WHERE contact_id = ?1) ORDER BY p.identity"
            ))?;
            let found = query.query_map([contact_id], profile_row)?.collect::<Result<_, _>>()?;
            Ok(found)
        })
        .await
    }

    async fn suggest_reviews(&self, identity: &str) -> Result<u64, StateError> {
        let identity = identity.to_owned();
        self.with(move |conn| {
            let Some(me) = profile(conn, &identity)? else { return Ok(0) };
            let similar = |column: &str| SIMILAR_HANDLE_SQL.replace("{}", column);
            // A website is the same with or without `https`, `www.` or a closing slash.
            let site = |v: &str| {
                format!("rtrim(replace(replace(replace(lower({v}), 'https://', ''), 'http://', ''), 'www.', ''), '/')")
            };
            let same_website = format!(
                "(SELECT b.value FROM json_each(COALESCE(p.links, '[]')) a, json_each(COALESCE(?5, '[]')) b
                 WHERE a.value LIKE 'http%' AND b.value LIKE 'http%' AND {} = {} LIMIT 1)",
                site("a.value"),
                site("b.value")
            );
            let mut query = conn.prepare(&format!(
                "SELECT {PROFILE_COLUMNS},
                   length(trim(COALESCE(?2, ''))) >= 3 AND lower(trim(p.display_name)) = lower(trim(?2)),
                   length({me_handle}) >= 4 AND {their_handle} = {me_handle},
                   {same_website}
                 FROM profiles p
                 WHERE p.platform != ?3 AND p.identity != ?1
                   AND ((length(trim(COALESCE(?2, ''))) >= 3 AND lower(trim(p.display_name)) = lower(trim(?2)))
                     OR (length({me_handle}) >= 4 AND {their_handle} = {me_handle})
                     OR {same_website} IS NOT NULL)",
                me_handle = similar("?4"),
                their_handle = similar("p.handle"),
            ))?;
            let my_links = (!me.links.is_empty()).then(|| serde_json::to_string(&me.links).unwrap_or_default());
            let candidates: Vec<(Profile, bool, bool, Option<String>)> = query
                .query_map(params![identity, me.display_name, me.platform, me.handle, my_links], |r| {
                    Ok((profile_row(r)?, r.get(11)?, r.get(12)?, r.get(13)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut queued = 0;
            for (other, same_name, same_handle, website) in candidates {
                // Both sides resolved, to different contacts: an unresolved
                // side may still land on the same one, and is checked when it does.
                if me.contact_id.is_none() || other.contact_id.is_none() || other.contact_id == me.contact_id {
                    continue;
                }
                let mut evidence = Vec::new();
                if same_name {
                    evidence.push(format!("same display name \"{}\"", me.display_name.as_deref().unwrap_or("")));
                }
                if let Some(website) = website {
                    evidence.push(format!("same website {website}"));
                }
                if same_handle {
                    evidence.push(format!(
                        "similar handles \"{}\" and \"{}\"",
                        me.handle.as_deref().unwrap_or(""),
                        other.handle.as_deref().unwrap_or("")
                    ));
                }
                queued += u64::from(queue_review(conn, &me.identity, &other.identity, &evidence.join(", "))?);
            }
            Ok(queued)
        })
        .await
    }

    async fn reviews(&self, status: Option<&str>) -> Result<Vec<Review>, StateError> {
        let status = status.map(str::to_owned);
        self.with(move |conn| {
            let mut query = conn.prepare(
                "SELECT id, identity_a, identity_b, evidence, status, created_at FROM identity_reviews
                 WHERE ?1 IS NULL OR status = ?1 ORDER BY id",
            )?;
            let rows: Vec<(i64, String, String, String, String, i64)> = query
                .query_map([status], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?
                .collect::<Result<_, _>>()?;
            rows.into_iter().map(|row| review_row(conn, row)).collect()
        })
        .await
    }

    async fn decide_review(&self, id: i64, approved: bool) -> Result<Option<Review>, StateError> {
        self.with(move |conn| {
            let status = if approved { "approved" } else { "rejected" };
            let changed = conn.execute(
                "UPDATE identity_reviews SET status = ?2, decided_at = ?3 WHERE id = ?1",
                params![id, status, now_ms()],
            )?;
            if changed == 0 {
                return Ok(None);
            }
            review_by_id(conn, id)
        })
        .await
    }

    async fn review(&self, id: i64) -> Result<Option<Review>, StateError> {
        self.with(move |conn| review_by_id(conn, id)).await
    }

    async fn profiles_seen_since(&self, since: DateTime<Utc>) -> Result<Vec<Profile>, StateError> {
        self.with(move |conn| {
            let mut query = conn.prepare(&format!(
                "SELECT {PROFILE_COLUMNS} FROM profiles p WHERE p.last_seen >= ?1 ORDER BY p.identity"
            ))?;
            let found = query.query_map([since.timestamp_millis()], profile_row)?.collect::<Result<_, _>>()?;
            Ok(found)
        })
        .await
    }

    async fn profile(&self, identity: &str) -> Result<Option<Profile>, StateError> {
        let identity = identity.to_owned();
        self.with(move |conn| profile(conn, &identity)).await
    }

    async fn queue_review(&self, a: &str, b: &str, evidence: &str) -> Result<bool, StateError> {
        let (a, b, evidence) = (a.to_owned(), b.to_owned(), evidence.to_owned());
        self.with(move |conn| queue_review(conn, &a, &b, &evidence)).await
    }

    async fn approve_pair(&self, a: &str, b: &str, evidence: &str) -> Result<(), StateError> {
        let (a, b) = if a < b { (a.to_owned(), b.to_owned()) } else { (b.to_owned(), a.to_owned()) };
        let evidence = evidence.to_owned();
        self.with(move |conn| {
            let now = now_ms();
            conn.execute(
                "INSERT INTO identity_reviews (identity_a, identity_b, evidence, status, created_at, decided_at)
                 VALUES (?1, ?2, ?3, 'approved', ?4, ?4)
                 ON CONFLICT (identity_a, identity_b) DO UPDATE SET status = 'approved', decided_at = excluded.decided_at",
                params![a, b, evidence, now],
            )?;
            Ok(())
        })
        .await
    }

    async fn approved_partners(&self, identity: &str) -> Result<Vec<String>, StateError> {
        let identity = identity.to_owned();
        self.with(move |conn| {
            let mut query = conn.prepare(
                "SELECT CASE WHEN identity_a = ?1 THEN identity_b ELSE identity_a END FROM identity_reviews
                 WHERE status = 'approved' AND (identity_a = ?1 OR identity_b = ?1) ORDER BY id",
            )?;
            let partners = query.query_map([identity], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(partners)
        })
        .await
    }

    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), StateError> {
        let (survivor, merged) = (survivor.to_owned(), merged.to_owned());
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for table in ["identities", "activities", "outbox", "alerts"] {
                tx.execute(
                    &format!("UPDATE {table} SET contact_id = ?1 WHERE contact_id = ?2"),
                    params![survivor, merged],
                )?;
            }
            tx.execute("DELETE FROM rollups_due WHERE contact_id = ?1", [&merged])?;
            tx.execute(
                "INSERT INTO rollups_due (contact_id, version) VALUES (?1, 1)
                 ON CONFLICT (contact_id) DO UPDATE SET version = version + 1",
                [&survivor],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn remember_forgotten(&self, digests: &[String]) -> Result<(), StateError> {
        let digests = digests.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for digest in &digests {
                tx.execute(
                    "INSERT INTO forgotten (digest, at) VALUES (?1, ?2) ON CONFLICT (digest) DO NOTHING",
                    params![digest, now_ms()],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn person_activities(&self, identities: &[String], contacts: &[String]) -> Result<Vec<String>, StateError> {
        let (identities, contacts) = (identities.to_vec(), contacts.to_vec());
        self.with(move |conn| {
            let mut query = conn.prepare(&format!(
                "SELECT DISTINCT activity_id FROM activities WHERE identity IN ({}) OR contact_id IN ({}) ORDER BY activity_id",
                placeholders(identities.len()),
                placeholders(contacts.len())
            ))?;
            let ids = query
                .query_map(rusqlite::params_from_iter(identities.iter().chain(contacts.iter())), |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .await
    }

    async fn erase_person(
        &self,
        identities: &[String],
        emails: &[String],
        contacts: &[String],
        needles: &[String],
    ) -> Result<Erased, StateError> {
        let identities = identities.to_vec();
        let emails: Vec<String> = emails.iter().map(|e| e.trim().to_lowercase()).collect();
        let contacts = contacts.to_vec();
        let needles: Vec<String> = needles.iter().filter(|n| n.chars().count() >= 4).cloned().collect();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut erased = Erased::default();
            let ids = placeholders(identities.len());
            let mails = placeholders(emails.len());
            let people = placeholders(contacts.len());
            let values = |lists: &[&Vec<String>]| -> Vec<String> { lists.iter().flat_map(|l| l.iter().cloned()).collect() };

            // Every contribution of theirs: delivered (activity index) or not (outbox payloads).
            let mut keys: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
            {
                let mut query = tx.prepare(&format!(
                    "SELECT key, activity_id FROM activities WHERE identity IN ({ids}) OR contact_id IN ({people})"
                ))?;
                let rows = query.query_map(rusqlite::params_from_iter(values(&[&identities, &contacts])), |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                for row in rows {
                    let (key, activity_id) = row?;
                    keys.insert(key);
                    erased.activity_ids.push(activity_id);
                }
                let mut query = tx.prepare(&format!(
                    "SELECT DISTINCT key FROM outbox
                     WHERE json_extract(payload, '$.platform') || ':' || json_extract(payload, '$.author.id') IN ({ids})
                        OR lower(json_extract(payload, '$.author.email')) IN ({mails})
                        OR contact_id IN ({people})"
                ))?;
                let rows = query
                    .query_map(rusqlite::params_from_iter(values(&[&identities, &emails, &contacts])), |r| r.get(0))?;
                for key in rows {
                    keys.insert(key?);
                }
            }
            let keys: Vec<String> = keys.into_iter().collect();
            let key_list = placeholders(keys.len());
            let by_key = |sql: &str| -> Result<usize, StateError> {
                Ok(tx.execute(&sql.replace("{keys}", &key_list), rusqlite::params_from_iter(keys.iter()))?)
            };
            erased.contributions = by_key("DELETE FROM ledger WHERE key IN ({keys})")? as u64;
            erased.outbox_rows = by_key("DELETE FROM outbox WHERE key IN ({keys})")? as u64;
            by_key("DELETE FROM activities WHERE key IN ({keys})")?;
            erased.alerts = by_key("DELETE FROM alerts WHERE key IN ({keys})")? as u64;
            erased.alerts +=
                tx.execute(&format!("DELETE FROM alerts WHERE contact_id IN ({people})"), rusqlite::params_from_iter(contacts.iter()))?
                    as u64;
            tx.execute(
                &format!("DELETE FROM activities WHERE contact_id IN ({people})"),
                rusqlite::params_from_iter(contacts.iter()),
            )?;
            tx.execute(
                &format!("DELETE FROM rollups_due WHERE contact_id IN ({people})"),
                rusqlite::params_from_iter(contacts.iter()),
            )?;
            erased.reviews = tx.execute(
                &format!("DELETE FROM identity_reviews WHERE identity_a IN ({ids}) OR identity_b IN ({ids})"),
                rusqlite::params_from_iter(identities.iter().chain(identities.iter())),
            )? as u64;
            // Links by identity, by an administrator's `platform@handle`, and to their contacts.
            let aliases: Vec<String> = {
                let mut query = tx.prepare(&format!(
                    "SELECT platform || '@' || lower(handle) FROM profiles WHERE handle IS NOT NULL AND identity IN ({ids})"
                ))?;
                query.query_map(rusqlite::params_from_iter(identities.iter()), |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            erased.identities = tx.execute(
                &format!(
                    "DELETE FROM identities WHERE identity IN ({ids}) OR identity IN ({}) OR contact_id IN ({people})",
                    placeholders(aliases.len())
                ),
                rusqlite::params_from_iter(identities.iter().chain(aliases.iter()).chain(contacts.iter())),
            )? as u64;
            tx.execute(
                &format!("DELETE FROM profiles WHERE identity IN ({ids}) OR email IN ({mails})"),
                rusqlite::params_from_iter(identities.iter().chain(emails.iter())),
            )?;
            for needle in &needles {
                erased.quarantined += tx.execute(
                    "DELETE FROM quarantine WHERE instr(lower(raw), lower(?1)) > 0 OR instr(lower(reason), lower(?1)) > 0",
                    [needle],
                )? as u64;
            }
            tx.commit()?;
            Ok(erased)
        })
        .await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StateError> {
        self.with(|conn| {
            let mut statement = conn.prepare(
                "SELECT id, source, key, attempts, COALESCE(last_error, ''), COALESCE(finished_at, 0)
                 FROM outbox WHERE status = 'dead' ORDER BY id",
            )?;
            let letters = statement
                .query_map([], |r| {
                    Ok(DeadLetter {
                        id: r.get(0)?,
                        source: r.get(1)?,
                        key: r.get(2)?,
                        attempts: r.get(3)?,
                        error: r.get(4)?,
                        failed_at: from_ms(r.get(5)?),
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(letters)
        })
        .await
    }

    async fn retry_dead_letters(&self, ids: &[i64]) -> Result<u64, StateError> {
        let filter = if ids.is_empty() { String::new() } else { format!(" AND id IN ({})", in_list(ids)) };
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Only the newest version of a key may come back: a dead row that
            // a later version superseded (pending, delivered or dead) goes.
            tx.execute(
                &format!(
                    "DELETE FROM outbox WHERE status = 'dead'{filter}
                     AND EXISTS (SELECT 1 FROM outbox newer WHERE newer.key = outbox.key AND newer.id > outbox.id)"
                ),
                [],
            )?;
            let count = tx.execute(
                &format!(
                    "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?1, finished_at = NULL
                     WHERE status = 'dead'{filter}"
                ),
                [now_ms()],
            )?;
            tx.commit()?;
            Ok(count as u64)
        })
        .await
    }

    async fn drop_dead_letters(&self, ids: &[i64]) -> Result<u64, StateError> {
        let filter = if ids.is_empty() { String::new() } else { format!(" AND id IN ({})", in_list(ids)) };
        self.with(
            move |conn| Ok(conn.execute(&format!("DELETE FROM outbox WHERE status = 'dead'{filter}"), [])? as u64),
        )
        .await
    }

    async fn acquire_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, StateError> {
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.with(move |conn| {
            let now = now_ms();
            let changed = conn.execute(
                "INSERT INTO leases (name, owner, until) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until
                 WHERE leases.owner = excluded.owner OR leases.until < ?4",
                params![name, owner, now + ttl.as_millis() as i64, now],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn release_lease(&self, name: &str, owner: &str) -> Result<(), StateError> {
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.with(move |conn| {
            conn.execute("DELETE FROM leases WHERE name = ?1 AND owner = ?2", params![name, owner])?;
            Ok(())
        })
        .await
    }

    async fn prune(&self, older_than: DateTime<Utc>) -> Result<u64, StateError> {
        let cutoff = older_than.timestamp_millis();
        // In chunks, each its own transaction, so the one connection (and
        // the health checks behind it) is never held for long.
        let mut total = 0;
        loop {
            let deleted = self
                .with(move |conn| {
                    let rows = conn.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
                           WHERE status IN ('delivered', 'skipped') AND finished_at < ?1 LIMIT 5000)",
                        [cutoff],
                    )?;
                    let quarantined = conn.execute(
                        "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine WHERE at < ?1 LIMIT 5000)",
                        [cutoff],
                    )?;
                    // Raw text kept elsewhere goes too; the rows stay (at most one alert per contribution).
                    let excerpts = conn.execute(
                        "UPDATE activities SET excerpt = NULL WHERE key IN (SELECT key FROM activities
                           WHERE excerpt IS NOT NULL AND created_at < ?1 LIMIT 5000)",
                        [cutoff],
                    )?;
                    let alerts = conn.execute(
                        "UPDATE alerts SET payload = '{}' WHERE id IN (SELECT id FROM alerts
                           WHERE status != 'pending' AND payload != '{}' AND created_at < ?1 LIMIT 5000)",
                        [cutoff],
                    )?;
                    Ok((rows + quarantined + excerpts + alerts) as u64)
                })
                .await?;
            total += deleted;
            if deleted == 0 {
                return Ok(total);
            }
        }
    }

    async fn owners(&self) -> Result<Vec<String>, StateError> {
        self.with(|conn| {
            let mut statement = conn.prepare(
                "SELECT owner FROM leases UNION SELECT DISTINCT lease_owner FROM outbox WHERE lease_owner IS NOT NULL",
            )?;
            let owners = statement.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(owners)
        })
        .await
    }

    async fn release_owner(&self, owner: &str) -> Result<u64, StateError> {
        let owner = owner.to_owned();
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let leases = tx.execute("DELETE FROM leases WHERE owner = ?1", [&owner])?;
            let rows = tx
                .execute("UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?1", [&owner])?;
            tx.commit()?;
            Ok((leases + rows) as u64)
        })
        .await
    }

    async fn enqueue_alert(
        &self,
        rule: &str,
        key: &str,
        contact_id: Option<&str>,
        payload: &serde_json::Value,
    ) -> Result<bool, StateError> {
        let (rule, key, contact_id) = (rule.to_owned(), key.to_owned(), contact_id.map(str::to_owned));
        let payload = payload.to_string();
        self.with(move |conn| {
            let now = now_ms();
            let added = conn.execute(
                "INSERT INTO alerts (rule, key, contact_id, payload, next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (rule, key) DO NOTHING",
                params![rule, key, contact_id, payload, now],
            )?;
            Ok(added == 1)
        })
        .await
    }

    async fn due_alerts(&self, rule: Option<&str>, limit: usize) -> Result<Vec<PendingAlert>, StateError> {
        let rule = rule.map(str::to_owned);
        self.with(move |conn| {
            let mut query = conn.prepare(
                "SELECT id, rule, key, payload, attempts FROM alerts
                 WHERE status = 'pending' AND next_attempt_at <= ?1 AND (?3 IS NULL OR rule = ?3) ORDER BY id LIMIT ?2",
            )?;
            let rows: Vec<(i64, String, String, String, u32)> = query
                .query_map(params![now_ms(), limit as i64, rule], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(id, rule, key, payload, attempts)| {
                    let payload = serde_json::from_str(&payload).map_err(|e| StateError::Other(e.to_string()))?;
                    Ok(PendingAlert { id, rule, key, payload, attempts })
                })
                .collect()
        })
        .await
    }

    async fn alert_done(&self, id: i64, outcome: AlertOutcome) -> Result<(), StateError> {
        self.with(move |conn| {
            let now = now_ms();
            match outcome {
                AlertOutcome::Sent => conn.execute(
                    "UPDATE alerts SET status = 'sent', sent_at = ?2, attempts = attempts + 1, last_error = NULL WHERE id = ?1",
                    params![id, now],
                )?,
                AlertOutcome::Retry { error, at } => conn.execute(
                    "UPDATE alerts SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3 WHERE id = ?1",
                    params![id, error, at.timestamp_millis()],
                )?,
                AlertOutcome::Failed { error } => conn.execute(
                    "UPDATE alerts SET status = 'failed', attempts = attempts + 1, last_error = ?2, sent_at = ?3 WHERE id = ?1",
                    params![id, error, now],
                )?,
            };
            Ok(())
        })
        .await
    }

    async fn record_poll(&self, source: &str, error: Option<&str>) -> Result<(), StateError> {
        let (source, error) = (source.to_owned(), error.map(str::to_owned));
        self.with(move |conn| {
            let now = now_ms();
            match error {
                None => conn.execute(
                    "INSERT INTO source_polls (source, last_poll_at, last_success_at, consecutive_failures, last_error)
                     VALUES (?1, ?2, ?2, 0, NULL)
                     ON CONFLICT (source) DO UPDATE SET last_poll_at = ?2, last_success_at = ?2, consecutive_failures = 0, last_error = NULL",
                    params![source, now],
                )?,
                Some(error) => conn.execute(
                    "INSERT INTO source_polls (source, last_poll_at, consecutive_failures, last_error) VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT (source) DO UPDATE SET last_poll_at = ?2, consecutive_failures = consecutive_failures + 1, last_error = ?3",
                    params![source, now, error],
                )?,
            };
            Ok(())
        })
        .await
    }

    async fn source_states(&self) -> Result<Vec<SourceState>, StateError> {
        self.with(|conn| {
            let mut statement = conn.prepare(
                "WITH names AS (SELECT source FROM source_polls UNION SELECT source FROM cursors
                   UNION SELECT source FROM activities WHERE source IS NOT NULL UNION SELECT source FROM quarantine)
                 SELECT n.source, p.last_poll_at, p.last_success_at, COALESCE(p.consecutive_failures, 0), p.last_error, p.newest_item_at,
                   (SELECT COUNT(*) FROM outbox o WHERE o.source = n.source AND o.status = 'pending'),
                   (SELECT COUNT(*) FROM outbox o WHERE o.source = n.source AND o.status = 'dead'),
                   (SELECT COUNT(*) FROM activities a WHERE a.source = n.source),
                   (SELECT COUNT(*) FROM quarantine q WHERE q.source = n.source)
                 FROM names n LEFT JOIN source_polls p ON p.source = n.source ORDER BY n.source",
            )?;
            let states = statement
                .query_map([], |r| {
                    Ok(SourceState {
                        name: r.get(0)?,
                        last_poll_at: r.get::<_, Option<i64>>(1)?.map(from_ms),
                        last_success_at: r.get::<_, Option<i64>>(2)?.map(from_ms),
                        consecutive_failures: r.get(3)?,
                        last_error: r.get(4)?,
                        newest_item_at: r.get::<_, Option<i64>>(5)?.map(from_ms),
                        backlog: r.get::<_, i64>(6)? as u64,
                        dead_letters: r.get::<_, i64>(7)? as u64,
                        delivered: r.get::<_, i64>(8)? as u64,
                        quarantined: r.get::<_, i64>(9)? as u64,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(states)
        })
        .await
    }

    async fn totals(&self) -> Result<Totals, StateError> {
        self.with(|conn| {
            Ok(conn.query_row(
                "SELECT (SELECT COUNT(*) FROM outbox WHERE status = 'pending'),
                        (SELECT COUNT(*) FROM outbox WHERE status = 'dead'),
                        (SELECT COUNT(*) FROM activities),
                        (SELECT COUNT(*) FROM quarantine),
                        (SELECT COUNT(*) FROM identities),
                        (SELECT COUNT(*) FROM identity_reviews WHERE status = 'pending'),
                        (SELECT COUNT(*) FROM alerts WHERE status = 'pending'),
                        (SELECT COUNT(*) FROM alerts WHERE status = 'failed')",
                [],
                |r| {
                    Ok(Totals {
                        backlog: r.get::<_, i64>(0)? as u64,
                        dead_letters: r.get::<_, i64>(1)? as u64,
                        delivered: r.get::<_, i64>(2)? as u64,
                        quarantined: r.get::<_, i64>(3)? as u64,
                        identities: r.get::<_, i64>(4)? as u64,
                        pending_reviews: r.get::<_, i64>(5)? as u64,
                        alerts_pending: r.get::<_, i64>(6)? as u64,
                        alerts_failed: r.get::<_, i64>(7)? as u64,
                    })
                },
            )?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use tributary_sdk::Kind;

    use super::*;

    fn item(id: &str, body: &str) -> Contribution {
        let mut c = tributary_demo::DemoSource::new("s", Default::default()).contribution(0);
        c.external_id = id.into();
        c.body = body.into();
        c.kind = Kind::Post;
        c
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn the_ledger_drops_unchanged_items_and_the_cursor_moves_with_the_page() {
        let (_dir, store) = store();
        let first = store
            .commit_page("s", vec![item("1", "a"), item("2", "b")], vec![], Some(Cursor("c1".into())))
            .await
            .unwrap();
        assert_eq!((first.new, first.updated, first.unchanged), (2, 0, 0));
        assert_eq!(store.cursor("s").await.unwrap(), Some(Cursor("c1".into())));
        let again = store.commit_page("s", vec![item("1", "a"), item("2", "b, edited")], vec![], None).await.unwrap();
        assert_eq!((again.new, again.updated, again.unchanged), (0, 1, 1));
        assert_eq!(store.cursor("s").await.unwrap(), Some(Cursor("c1".into())), "None keeps the cursor");
        // The edit replaced the pending version: still one row per key.
        let claimed = store.claim("w", 10, Duration::from_secs(60)).await.unwrap();
        assert_eq!(claimed.len(), 2);
        assert_eq!(claimed[1].contribution.body, "b, edited");
        assert!(
            store.claim("other", 10, Duration::from_secs(60)).await.unwrap().is_empty(),
            "leased rows are not claimed twice"
        );
    }

    #[tokio::test]
    async fn renewed_claims_outlive_their_first_lease() {
        let (_dir, store) = store();
        store.commit_page("s", vec![item("9", "x")], vec![], None).await.unwrap();
        store.claim("w", 10, Duration::from_millis(30)).await.unwrap();
        store.renew_claims("w", Duration::from_secs(60)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            store.claim("other", 10, Duration::from_secs(60)).await.unwrap().is_empty(),
            "a renewed claim was taken"
        );
        store.commit_page("s", vec![item("8", "y")], vec![], None).await.unwrap();
        store.claim("w", 10, Duration::from_millis(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store.claim("other", 10, Duration::from_secs(60)).await.unwrap().len(),
            1,
            "an expired claim is free"
        );
    }

    #[tokio::test]
    async fn an_edit_during_delivery_is_delivered_after_it() {
        let (_dir, store) = store();
        store.commit_page("s", vec![item("1", "v1")], vec![], None).await.unwrap();
        let claimed = store.claim("w", 10, Duration::from_secs(60)).await.unwrap();
        store.commit_page("s", vec![item("1", "v2")], vec![], None).await.unwrap();
        let row = &claimed[0];
        let delivered = Delivery::Delivered { contact_id: "c".into(), activity_id: "a".into() };
        store
            .finish(
                "w",
                vec![Finished {
                    id: row.id,
                    content_hash: row.content_hash.clone(),
                    contribution: row.contribution.clone(),
                    delivery: delivered,
                }],
            )
            .await
            .unwrap();
        let next = store.claim("w", 10, Duration::from_secs(60)).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].contribution.body, "v2");
    }

    #[tokio::test]
    async fn dead_letters_can_be_retried_and_dropped_and_rollups_follow_deliveries() {
        let (_dir, store) = store();
        store
            .commit_page("s", vec![item("1", "a"), item("2", "b")], vec![Quarantined::new(None, "bad", "{")], None)
            .await
            .unwrap();
        let claimed = store.claim("w", 10, Duration::from_secs(60)).await.unwrap();
        let finished = vec![
            Finished {
                id: claimed[0].id,
                content_hash: claimed[0].content_hash.clone(),
                contribution: claimed[0].contribution.clone(),
                delivery: Delivery::Dead { error: "INVALID_EMAIL".into() },
            },
            Finished {
                id: claimed[1].id,
                content_hash: claimed[1].content_hash.clone(),
                contribution: claimed[1].contribution.clone(),
                delivery: Delivery::Delivered { contact_id: "c1".into(), activity_id: "n1".into() },
            },
        ];
        store.finish("w", finished).await.unwrap();
        let letters = store.dead_letters().await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].error, "INVALID_EMAIL");
        let totals = store.totals().await.unwrap();
        assert_eq!((totals.backlog, totals.dead_letters, totals.delivered, totals.quarantined), (0, 1, 1, 1));

        let rollups = store.pending_rollups(10, Utc::now()).await.unwrap();
        assert_eq!(rollups.len(), 1);
        assert_eq!(rollups[0].contribution_count, 1);
        store.rollups_written(&rollups).await.unwrap();
        assert!(store.pending_rollups(10, Utc::now()).await.unwrap().is_empty());

        // Pruning drops finished rows and raw text (the delivered row, the
        // quarantined item, the activity's excerpt), not what they did: the
        // ledger still knows the item and the delivered count stays.
        assert_eq!(store.prune(Utc::now() + chrono::Duration::seconds(1)).await.unwrap(), 3);
        assert_eq!(store.totals().await.unwrap().delivered, 1);
        let again = store.commit_page("s", vec![claimed[1].contribution.clone()], vec![], None).await.unwrap();
        assert_eq!(again.unchanged, 1, "a pruned item is still known");

        assert_eq!(store.retry_dead_letters(&[]).await.unwrap(), 1);
        assert_eq!(store.claim("w", 10, Duration::from_secs(60)).await.unwrap().len(), 1);
        assert_eq!(store.drop_dead_letters(&[]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_version_1_database_is_migrated_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL);",
            )
            .unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "INSERT INTO schema_migrations VALUES (1, 0);
                 INSERT INTO ledger VALUES ('p:forum:1', 'forum', 'h', 0, 0);
                 INSERT INTO activities (key, contact_id, activity_id, platform, created_at) VALUES ('p:forum:1', 'c', 'a', 'p', 0);
                 INSERT INTO quarantine (source, reason, raw, at) VALUES ('forum', 'bad', '{', 0);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let states = store.source_states().await.unwrap();
        let forum = states.iter().find(|s| s.name == "forum").unwrap();
        assert_eq!((forum.delivered, forum.quarantined), (1, 1));
        let version: i64 = store
            .with(|c| Ok(c.query_row("SELECT MAX(version) FROM schema_migrations", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        drop(store);
        SqliteStore::open(&path).unwrap();
    }

    async fn finish_all(store: &SqliteStore, delivery: Delivery) {
        for row in store.claim("w", 10, Duration::from_secs(60)).await.unwrap() {
            let finished = Finished {
                id: row.id,
                content_hash: row.content_hash,
                contribution: row.contribution,
                delivery: delivery.clone(),
            };
            store.finish("w", vec![finished]).await.unwrap();
        }
    }

    #[tokio::test]
    async fn retrying_dead_letters_brings_back_only_the_newest_version() {
        let (_dir, store) = store();
        let dead = Delivery::Dead { error: "refused".into() };
        // v1 died, v2 was delivered: retrying must not send v1 over v2.
        store.commit_page("s", vec![item("1", "v1")], vec![], None).await.unwrap();
        finish_all(&store, dead.clone()).await;
        store.commit_page("s", vec![item("1", "v2")], vec![], None).await.unwrap();
        finish_all(&store, Delivery::Delivered { contact_id: "c".into(), activity_id: "a".into() }).await;
        assert_eq!(store.retry_dead_letters(&[]).await.unwrap(), 0);
        assert!(store.dead_letters().await.unwrap().is_empty(), "the superseded version is gone");

        // w1 and w2 both died: one retry brings back w2 alone.
        store.commit_page("s", vec![item("2", "w1")], vec![], None).await.unwrap();
        finish_all(&store, dead.clone()).await;
        store.commit_page("s", vec![item("2", "w2")], vec![], None).await.unwrap();
        finish_all(&store, dead).await;
        assert_eq!(store.dead_letters().await.unwrap().len(), 2);
        assert_eq!(store.retry_dead_letters(&[]).await.unwrap(), 1);
        let claimed = store.claim("w", 10, Duration::from_secs(60)).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].contribution.body, "w2");
    }

    #[tokio::test]
    async fn a_forgotten_contact_is_resolved_again_and_owes_no_rollup() {
        let (_dir, store) = store();
        store.commit_page("s", vec![item("1", "a")], vec![], None).await.unwrap();
        finish_all(&store, Delivery::Delivered { contact_id: "c1".into(), activity_id: "a1".into() }).await;
        store.link_identity("forum:u1", "c1", "email").await.unwrap();
        assert_eq!(store.pending_rollups(10, Utc::now()).await.unwrap().len(), 1);
        store.forget_contact("c1").await.unwrap();
        assert!(store.pending_rollups(10, Utc::now()).await.unwrap().is_empty());
        assert_eq!(store.identity("forum:u1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_alert_is_queued_once_and_its_body_goes_with_retention() {
        let (_dir, store) = store();
        let body = serde_json::json!({"text": "Maya: the export is broken"});
        assert!(store.enqueue_alert("unhappy", "k1", Some("c1"), &body).await.unwrap());
        assert!(!store.enqueue_alert("unhappy", "k1", Some("c1"), &body).await.unwrap(), "once per rule and key");
        assert!(store.enqueue_alert("other-rule", "k1", Some("c1"), &body).await.unwrap());
        let due = store.due_alerts(None, 10).await.unwrap();
        assert_eq!(due.len(), 2);
        store.alert_done(due[0].id, AlertOutcome::Sent).await.unwrap();
        let later = Utc::now() + chrono::Duration::hours(1);
        store.alert_done(due[1].id, AlertOutcome::Retry { error: "503".into(), at: later }).await.unwrap();
        assert!(store.due_alerts(None, 10).await.unwrap().is_empty(), "sent, and the other not due yet");
        assert!(store.due_alerts(Some("other-rule"), 10).await.unwrap().is_empty());

        // Past retention the sent alert's body goes; its row stays, so it is never sent again.
        store.prune(Utc::now() + chrono::Duration::seconds(1)).await.unwrap();
        let payloads: Vec<(String, String)> = store
            .with(|conn| {
                let mut query = conn.prepare("SELECT status, payload FROM alerts ORDER BY id")?;
                let rows = query.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await
            .unwrap();
        assert_eq!(payloads[0], ("sent".to_owned(), "{}".to_owned()));
        assert!(payloads[1].1.contains("export is broken"), "a pending alert keeps its body");
        assert!(!store.enqueue_alert("unhappy", "k1", Some("c1"), &body).await.unwrap());
    }

    #[tokio::test]
    async fn tokens_are_kept_in_a_file_only_its_owner_reads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "an older file is tightened");
        assert!(store.load_token("k").await.unwrap().is_none());
        let expires_at = Some(from_ms(now_ms() + 3_600_000));
        let token = StoredToken { access_token: "a1".into(), refresh_token: Some("r1".into()), expires_at };
        store.save_token("k", &token).await.unwrap();
        store.save_token("k", &StoredToken { access_token: "a2".into(), ..token }).await.unwrap();
        drop(store);
        let reopened = SqliteStore::open(&path).unwrap();
        let loaded = reopened.load_token("k").await.unwrap().unwrap();
        assert_eq!(loaded.access_token.expose_secret(), "a2");
        assert_eq!(loaded.refresh_token.unwrap().expose_secret(), "r1");
        assert_eq!(loaded.expires_at, expires_at);
        for file in ["state.db-wal", "state.db-shm"] {
            if let Ok(meta) = std::fs::metadata(dir.path().join(file)) {
                assert_eq!(meta.permissions().mode() & 0o077, 0, "{file} is readable by others");
            }
        }
    }

    #[tokio::test]
    async fn a_lease_has_one_owner_until_it_expires() {
        let (_dir, store) = store();
        assert!(store.acquire_lease("source:s", "a", Duration::from_secs(60)).await.unwrap());
        assert!(!store.acquire_lease("source:s", "b", Duration::from_secs(60)).await.unwrap());
        assert!(store.acquire_lease("source:s", "a", Duration::from_secs(60)).await.unwrap(), "renewal");
        store.release_lease("source:s", "a").await.unwrap();
        assert!(store.acquire_lease("source:s", "b", Duration::from_millis(1)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            store.acquire_lease("source:s", "a", Duration::from_secs(60)).await.unwrap(),
            "expired lease taken over"
        );
    }

    /// (days ago, platform, intent, sentiment) → (count_90d, 90-day mean, attention reason).
    fn check_rollup(rows: &[(i64, &str, &str, Option<f64>)], expected: (u64, Option<f64>, Option<&str>)) {
        let now = Utc::now();
        let mut rows: Vec<ActivityRow> = rows
            .iter()
            .map(|(days, platform, intent, sentiment)| ActivityRow {
                platform: (*platform).into(),
                created_at: now - chrono::Duration::days(*days),
                sentiment: *sentiment,
                intent: Some((*intent).into()),
                url: Some(format!("https://{platform}.example/{days}")),
                excerpt: Some(format!("{intent} {days}")),
                handle: Some(format!("{platform}-handle")),
                profile_url: None,
            })
            .collect();
        rows.sort_by_key(|r| r.created_at);
        let rollup = compute_rollup("c".into(), &rows, now);
        let reason = rollup.attention_reason.clone();
        assert_eq!(
            (rollup.count_90d, rollup.sentiment_avg_90d, reason.as_deref().map(|r| r.split(' ').next().unwrap_or(""))),
            expected,
            "{rollup:#?}"
        );
        assert_eq!(rollup.needs_attention, reason.is_some());
        assert_eq!(rollup.contribution_count, rows.len() as u64);
        assert_eq!(rollup.per_platform.iter().map(|p| p.contributions).sum::<u64>(), rows.len() as u64);
    }

    #[test]
    fn rollups_count_the_last_90_days_and_flag_what_needs_attention() {
        // Old activity counts overall, not in the 90 days.
        check_rollup(
            &[(200, "forum", "praise", Some(0.8)), (10, "forum", "question", Some(0.2))],
            (1, Some(0.2), None),
        );
        // A recent complaint with no praise after it is unresolved...
        check_rollup(
            &[(20, "forum", "praise", Some(0.6)), (3, "support", "complaint", Some(-0.6))],
            (2, Some(0.0), Some("unresolved")),
        );
        // ...resolved by later praise, and too old after 30 days.
        check_rollup(
            &[(3, "support", "complaint", Some(-0.6)), (1, "support", "praise", Some(0.7))],
            (2, Some(0.05), None),
        );
        check_rollup(&[(45, "support", "complaint", Some(-0.6))], (1, Some(-0.6), None));
        // A sharp drop: the last week well below the weeks before it.
        check_rollup(
            &[
                (60, "forum", "praise", Some(0.7)),
                (40, "forum", "other", Some(0.5)),
                (20, "social", "praise", Some(0.6)),
                (3, "social", "other", Some(-0.3)),
                (1, "forum", "question", Some(-0.2)),
            ],
            (5, Some(0.26), Some("sentiment")),
        );
        // Skipped sentiment (another language) is left out of the mean.
        check_rollup(&[(5, "forum", "question", None), (4, "forum", "idea", Some(0.4))], (2, Some(0.4), None));
        check_rollup(&[(5, "forum", "question", None)], (1, None, None));
    }
}
