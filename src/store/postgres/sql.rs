//! The statements of a PostgreSQL store, one per step.

pub(super) const IN_FLIGHT: i16 = 0;
pub(super) const COMPLETED: i16 = 1;
pub(super) const NOT_REPLAYABLE: i16 = 2;

/// The table, its expiry index and the `begin` function. An in-flight row
/// expires with its lease (`expires_at` = `lease_until`) until it is
/// fenced (`effect`); a fenced or completed row expires with its TTL.
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
    -- A function's body never changes under one name: a new body gets a
    -- new name, so that replicas of an older build keep theirs.
    IF to_regprocedure('{begin}(bytea, bytea, bytea, bigint)') IS NULL THEN
        {begin_function}
    END IF;
END $$;
",
        begin = begin_function_name(t),
        begin_function = begin_function(t),
    )
}

fn begin_function_name(t: &str) -> String {
    format!("{t}_begin_v1")
}

/// `begin` as a function: it reads the key first, so that a replay or a
/// conflict runs one plain read and takes no row lock, and only on a miss
/// runs the insert, which takes the key if it is free, its row expired,
/// or it is fenced and its lease ran out (a recovery, same fingerprint
/// only). A fence holds the row's lock until its transaction ends, so a
/// takeover racing it waits, then sees the mark.
///
/// It answers with a row of the table: the caller's own token in it if the
/// key was taken, and otherwise the live row (its response only for the
/// same fingerprint). The row is all NULL when the read and the insert's
/// conflict check disagree: a row committed by a racing insert after the
/// read, or one that looked expired or recoverable but was taken over,
/// completed or fenced before the check. Returning the table's own row
/// type, which PostgreSQL keeps cached, costs less per call than `OUT`
/// parameters, whose row type is rebuilt from the catalog on every call.
fn begin_function(t: &str) -> String {
    format!(
        "CREATE FUNCTION {name}(k BYTEA, fp BYTEA, tok BYTEA, lease_ms BIGINT)
        RETURNS {t} LANGUAGE plpgsql AS $begin$
        DECLARE
            found_row {t};
        BEGIN
            SELECT * INTO found_row FROM {t} AS r
            WHERE r.key = k AND r.expires_at > now()
              AND NOT (r.state = {IN_FLIGHT} AND r.effect AND r.lease_until <= now()
                       AND r.fingerprint = fp);
            IF FOUND THEN
                IF found_row.fingerprint <> fp THEN
                    found_row.response := NULL;
                END IF;
                RETURN found_row;
            END IF;
            INSERT INTO {t} AS r (key, fingerprint, state, token, lease_until, expires_at)
            VALUES (k, fp, {IN_FLIGHT}, tok, now() + lease_ms * interval '1 millisecond',
                    now() + lease_ms * interval '1 millisecond')
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
            RETURNING * INTO found_row;
            RETURN found_row;
        END $begin$;",
        name = begin_function_name(t),
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
            begin: format!(
                "SELECT state, token, effect, fingerprint, response FROM {}($1, $2, $3, $4)",
                begin_function_name(t)
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
