//! The statements of a PostgreSQL store, one per step.

pub(super) const IN_FLIGHT: i16 = 0;
pub(super) const COMPLETED: i16 = 1;
pub(super) const NOT_REPLAYABLE: i16 = 2;

/// The table and its expiry index. An in-flight row expires with its lease
/// (`expires_at` = `lease_until`) until it is fenced (`effect`); a fenced
/// or completed row expires with its TTL.
pub(super) fn migration(t: &str) -> String {
    let index = t.replace('.', "_");
    // An index lives in its table's schema.
    let qualified_index = match t.split_once('.') {
        Some((schema, _)) => format!("{schema}.{index}"),
        None => index.clone(),
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    key         BYTEA PRIMARY KEY,
    fingerprint BYTEA NOT NULL,
    state       SMALLINT NOT NULL,
    token       BYTEA NOT NULL,
    lease_until TIMESTAMPTZ,
    response    BYTEA,
    effect      BOOLEAN NOT NULL DEFAULT FALSE,
    expires_at  TIMESTAMPTZ NOT NULL
);
DO $$
BEGIN
    -- Only a table made by an earlier build is altered, and only a table
    -- without the index indexed: both lock the table, which every replica
    -- starting would otherwise do.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = to_regclass('{t}') AND attname = 'effect') THEN
        ALTER TABLE {t} ADD COLUMN effect BOOLEAN NOT NULL DEFAULT FALSE;
    END IF;
    IF to_regclass('{qualified_index}_expires_at') IS NULL THEN
        CREATE INDEX {index}_expires_at ON {t} (expires_at);
    END IF;
END $$;
"
    )
}

pub(super) struct Statements {
    pub(super) begin: String,
    pub(super) complete: String,
    pub(super) release: String,
    pub(super) renew: String,
    pub(super) fence: String,
    pub(super) delete_expired: String,
}

impl Statements {
    pub(super) fn for_table(t: &str) -> Self {
        Self {
            // A live row that may not be taken over is only read: a replay
            // or a conflict takes no row lock and writes nothing. Otherwise
            // the key is taken if it is free, its row expired, or it is
            // fenced and its lease ran out (a recovery, same fingerprint
            // only). A fence holds the row's lock until its transaction
            // ends, so a takeover racing it waits, then sees the mark.
            begin: format!(
                "WITH live AS (
                    SELECT fingerprint, state,
                           CASE WHEN fingerprint = $2 THEN response END AS response
                    FROM {t}
                    WHERE key = $1 AND expires_at > now()
                      AND NOT (state = {IN_FLIGHT} AND effect AND lease_until <= now()
                               AND fingerprint = $2)
                ), acquired AS (
                    INSERT INTO {t} AS r (key, fingerprint, state, token, lease_until, expires_at)
                    SELECT $1, $2, {IN_FLIGHT}, $3,
                           now() + $4 * interval '1 millisecond',
                           now() + $4 * interval '1 millisecond'
                    WHERE NOT EXISTS (SELECT 1 FROM live)
                    ON CONFLICT (key) DO UPDATE SET
                        fingerprint = EXCLUDED.fingerprint, state = {IN_FLIGHT},
                        token = EXCLUDED.token, lease_until = EXCLUDED.lease_until,
                        response = NULL,
                        effect = r.effect AND r.expires_at > now(),
                        expires_at = CASE WHEN r.effect AND r.expires_at > now()
                                          THEN greatest(r.expires_at, EXCLUDED.expires_at)
                                          ELSE EXCLUDED.expires_at END
                    WHERE r.expires_at <= now()
                       OR (r.state = {IN_FLIGHT} AND r.effect AND r.lease_until <= now()
                           AND r.fingerprint = EXCLUDED.fingerprint)
                    RETURNING effect
                )
                SELECT TRUE AS acquired, effect AS recovered, NULL::bytea AS fingerprint,
                       NULL::smallint AS state, NULL::bytea AS response
                FROM acquired
                UNION ALL
                SELECT FALSE, FALSE, fingerprint, state, response FROM live"
            ),
            complete: format!(
                "UPDATE {t} SET state = $3, response = $4,
                        lease_until = NULL, expires_at = now() + $5 * interval '1 millisecond'
                 WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT}"
            ),
            // An unfenced row is deleted; a fenced one is kept, its lease
            // ended, for the next request to recover.
            release: format!(
                "WITH deleted AS (
                    DELETE FROM {t}
                    WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT} AND NOT effect
                    RETURNING 1
                ), ended AS (
                    UPDATE {t} SET lease_until = now()
                    WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT} AND effect
                    RETURNING 1
                )
                SELECT (SELECT count(*) FROM deleted) + (SELECT count(*) FROM ended)"
            ),
            renew: format!(
                "UPDATE {t} SET lease_until = now() + $3 * interval '1 millisecond',
                        expires_at = CASE WHEN effect
                            THEN greatest(expires_at, now() + $3 * interval '1 millisecond')
                            ELSE now() + $3 * interval '1 millisecond' END
                 WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT}"
            ),
            // One statement: the mark if the token holds an unfenced row
            // whose lease is live, and what was there before, to say why
            // if not.
            fence: format!(
                "WITH fenced AS (
                    UPDATE {t} SET effect = TRUE,
                        expires_at = greatest(expires_at, now() + $3 * interval '1 millisecond')
                    WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT} AND NOT effect
                      AND lease_until > now()
                    RETURNING 1
                )
                SELECT EXISTS (SELECT 1 FROM fenced) AS fenced,
                       EXISTS (SELECT 1 FROM {t} WHERE key = $1 AND token = $2
                               AND state = {IN_FLIGHT} AND effect) AS committed"
            ),
            delete_expired: format!("DELETE FROM {t} WHERE expires_at <= now()"),
        }
    }
}
