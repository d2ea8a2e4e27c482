//! The statements of a PostgreSQL store, one per step.

pub(super) const IN_FLIGHT: i16 = 0;
pub(super) const COMPLETED: i16 = 1;
pub(super) const NOT_REPLAYABLE: i16 = 2;

/// The table, its expiry index and the `begin` function. An in-flight row
/// expires with its lease (`expires_at` = `lease_until`) until it is
/// fenced (`effect`); a fenced or completed row expires with its TTL.
pub(super) fn migration(t: &str) -> String {
    let names = Names::of(t);
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
DECLARE
    home REGNAMESPACE := (SELECT relnamespace FROM pg_class WHERE oid = to_regclass('{t}'));
    path TEXT := current_setting('search_path');
    waited TEXT := current_setting('lock_timeout');
BEGIN
    -- A table is altered, and indexed, only when it lacks the column, the
    -- compression or the index: each locks the table, which every replica
    -- starting would otherwise do. The index and the function are looked
    -- for in the table's own schema, where they are made: another schema
    -- on the search path may have its own.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = to_regclass('{t}') AND attname = 'effect') THEN
        ALTER TABLE {t} ADD COLUMN effect BOOLEAN NOT NULL DEFAULT FALSE;
    END IF;
    -- Responses long enough to be compressed are compressed with lz4,
    -- several times cheaper than PostgreSQL's own pglz, where the server
    -- has it (14 and later, built with lz4; the statement is run through
    -- EXECUTE so that older servers never parse it). The change locks the
    -- table: on a busy table it waits a tenth of a second at most, and a
    -- later migration tries again; a role that does not own the table
    -- leaves the compression as it is.
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        IF (SELECT attcompression FROM pg_attribute
            WHERE attrelid = to_regclass('{t}') AND attname = 'response') <> 'l' THEN
            BEGIN
                PERFORM set_config('lock_timeout', '100ms', true);
                EXECUTE 'ALTER TABLE {t} ALTER COLUMN response SET COMPRESSION lz4';
                PERFORM set_config('lock_timeout', waited, true);
            EXCEPTION WHEN lock_not_available OR insufficient_privilege THEN
                -- The block's settings are undone with it.
                NULL;
            END;
        END IF;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_class
                   WHERE relname = '{index}' AND relnamespace = home) THEN
        CREATE INDEX {index} ON {t} (expires_at);
    END IF;
    -- A function's body never changes under one name: a new body gets a
    -- new name, so that replicas of an older build keep theirs.
    IF NOT EXISTS (SELECT 1 FROM pg_proc
                   WHERE proname = '{function}' AND pronamespace = home) THEN
        PERFORM set_config('search_path', home::text, true);
        {begin_function}
        PERFORM set_config('search_path', path, true);
    END IF;
END $$;
",
        index = names.index,
        function = names.function,
        begin_function = begin_function(t, &names),
    )
}

/// What the migration names after a table, unqualified and as PostgreSQL
/// folds unquoted names: its index, and the function `begin` calls, both in
/// the table's schema.
pub(super) struct Names {
    pub(super) index: String,
    pub(super) function: String,
    /// The table's own name, without its schema.
    table: String,
}

impl Names {
    pub(super) fn of(t: &str) -> Self {
        let t = t.to_ascii_lowercase();
        let table = t.rsplit('.').next().unwrap_or(&t).to_owned();
        Self {
            index: format!("{}_expires_at", t.replace('.', "_")),
            function: format!("{table}_begin_v3"),
            table,
        }
    }

    /// Whether PostgreSQL keeps every name whole: it cuts longer ones to
    /// 63 bytes, and two tables could then share an index or a function.
    pub(super) fn fit(&self) -> bool {
        self.index.len() <= 63 && self.function.len() <= 63
    }
}

/// The function as `begin` calls it: in the table's schema, if the table
/// is qualified, and otherwise found on the search path as the table is.
fn begin_function_call(t: &str) -> String {
    let function = Names::of(t).function;
    match t.rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.{function}"),
        None => function,
    }
}

/// `begin` as a function: it reads the key first, so that a replay or a
/// conflict runs one plain read and takes no row lock. A missing key is
/// inserted with `ON CONFLICT DO NOTHING`; a row that expired, or is fenced
/// with its lease run out (a recovery, same fingerprint only), is taken
/// over by an `UPDATE` that checks again under the row's lock. Each of the
/// two writes is a plan of its own, so a first use sets up only the
/// insert, not the takeover's expressions too. A fence holds the row's
/// lock until its transaction ends, so a takeover racing it waits, then
/// sees the mark.
///
/// It answers with a row of the table: the caller's own token in it if the
/// key was taken, and otherwise the live row (its response only for the
/// same fingerprint). The row is all NULL when the read and the write
/// disagree: a row committed by a racing insert after the read, or one
/// that looked expired or recoverable but was deleted, taken over,
/// completed or fenced before the write. Returning the table's own row
/// type, which PostgreSQL keeps cached, costs less per call than `OUT`
/// parameters, whose row type is rebuilt from the catalog on every call.
fn begin_function(t: &str, names: &Names) -> String {
    format!(
        "CREATE FUNCTION {function}(k BYTEA, fp BYTEA, tok BYTEA, lease_ms BIGINT)
        RETURNS {table} LANGUAGE plpgsql AS $begin$
        DECLARE
            found_row {t};
            lease_end TIMESTAMPTZ;
        BEGIN
            SELECT * INTO found_row FROM {t} AS r WHERE r.key = k;
            IF NOT FOUND THEN
                INSERT INTO {t} (key, fingerprint, state, token, lease_until, expires_at)
                VALUES (k, fp, {IN_FLIGHT}, tok, now() + lease_ms * interval '1 millisecond',
                        now() + lease_ms * interval '1 millisecond')
                ON CONFLICT (key) DO NOTHING
                RETURNING * INTO found_row;
                RETURN found_row;
            END IF;
            IF found_row.expires_at > now()
               AND NOT (found_row.state = {IN_FLIGHT} AND found_row.effect
                        AND found_row.lease_until <= now() AND found_row.fingerprint = fp) THEN
                IF found_row.fingerprint <> fp THEN
                    found_row.response := NULL;
                END IF;
                RETURN found_row;
            END IF;
            -- The new lease runs from when the row is taken, not from when
            -- the call began (`now()`): a takeover that waited on the
            -- row's lock longer than a lease would otherwise take a lease
            -- that had already run out. The row is locked first, since an
            -- `UPDATE` that waits computes its new row before it waits,
            -- and keeps it if the holder rolled back.
            PERFORM 1 FROM {t} AS r WHERE r.key = k FOR NO KEY UPDATE;
            lease_end := clock_timestamp() + lease_ms * interval '1 millisecond';
            UPDATE {t} AS r SET
                fingerprint = fp, state = {IN_FLIGHT}, token = tok,
                lease_until = lease_end,
                response = NULL,
                effect = r.effect AND r.expires_at > now(),
                expires_at = CASE WHEN r.effect AND r.expires_at > now()
                                  THEN greatest(r.expires_at, lease_end)
                                  ELSE lease_end END
            WHERE r.key = k
              AND (r.expires_at <= now()
                   OR (r.state = {IN_FLIGHT} AND r.effect AND r.lease_until <= now()
                       AND r.fingerprint = fp))
            RETURNING * INTO found_row;
            RETURN found_row;
        END $begin$;",
        function = names.function,
        table = names.table,
    )
}

pub(super) struct Statements {
    pub(super) begin: String,
    pub(super) complete: String,
    /// Whether the token completed the key with the outcome.
    pub(super) completed_by: String,
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
                begin_function_call(t)
            ),
            complete: format!(
                "UPDATE {t} SET state = $3, response = $4,
                        lease_until = NULL, expires_at = now() + $5 * interval '1 millisecond'
                 WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT}"
            ),
            // A statement of its own rather than a wider `complete`, whose
            // condition every first use would pay for.
            completed_by: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE key = $1 AND token = $2 AND state = $3)"
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
            // From when the row is renewed, as a takeover's lease is: a
            // renewal may wait on the row's lock (a `fence_in` transaction
            // holds it), and so locks it before it computes the lease.
            renew: format!(
                "WITH held AS (
                    SELECT key FROM {t} WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT}
                    FOR NO KEY UPDATE
                 )
                 UPDATE {t} AS r SET lease_until = clock_timestamp() + $3 * interval '1 millisecond',
                        expires_at = CASE WHEN r.effect
                            THEN greatest(r.expires_at, clock_timestamp() + $3 * interval '1 millisecond')
                            ELSE clock_timestamp() + $3 * interval '1 millisecond' END
                 FROM held WHERE r.key = held.key"
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
