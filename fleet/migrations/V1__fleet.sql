-- The fleet's schema, version 1: hosts and their VMs, commands and their invocations, the
-- output of invocations, programs pushed by reference, and the control plane's audit log.
-- The counters of a command (`active`, `errors`) are kept by a trigger on invocations, so
-- that every path that changes an invocation's state (a host's report, a cancel, the
-- sweeper) keeps them true in the same transaction.

CREATE TABLE hosts (
    name           text        PRIMARY KEY,
    labels         jsonb       NOT NULL DEFAULT '{}',
    software       text        NOT NULL DEFAULT '',
    registered_at  timestamptz NOT NULL DEFAULT now(),
    heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    -- Incremented by every registration: a daemon's start.
    boots          bigint      NOT NULL DEFAULT 1
);

CREATE TABLE vms (
    host               text        NOT NULL REFERENCES hosts (name) ON DELETE CASCADE,
    name               text        NOT NULL,
    labels             jsonb       NOT NULL DEFAULT '{}',
    -- The host's `VmInfo` of the VM, as JSON.
    info               jsonb       NOT NULL,
    -- The host's `CommandList` of the VM, as JSON, once it has one.
    commands           jsonb,
    commands_revision  bigint,
    commands_at        timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, name)
);

CREATE TABLE commands (
    id               bigserial   PRIMARY KEY,
    idempotency_key  text        UNIQUE,
    -- SHA-256 of the request (target, command, args, timeout, limits), to tell a repeated
    -- request from another one under the same key.
    request_sha256   text        NOT NULL,
    principal        text        NOT NULL,
    target           text        NOT NULL,
    command          text        NOT NULL,
    args             jsonb       NOT NULL,
    timeout_ms       bigint,
    -- Resolved counts (a percentage is resolved at creation); NULL: no limit.
    max_concurrency  integer,
    max_errors       integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    deliver_by       timestamptz NOT NULL,
    -- Invocations claimed by their host and not yet final.
    active           integer     NOT NULL DEFAULT 0,
    -- Invocations that ended in an error state (not succeeded, cancelled or
    -- delivery_timed_out).
    errors           integer     NOT NULL DEFAULT 0,
    invocations      integer     NOT NULL DEFAULT 0
);

CREATE TABLE invocations (
    id                bigserial   PRIMARY KEY,
    command_id        bigint      NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    host              text        NOT NULL,
    vm                text        NOT NULL,
    principal         text        NOT NULL,
    command           text        NOT NULL,
    args              jsonb       NOT NULL,
    timeout_ms        bigint,
    state             text        NOT NULL DEFAULT 'pending',
    -- Incremented by every claim; a host's reports are fenced by it.
    attempt           integer     NOT NULL DEFAULT 0,
    lease_until       timestamptz,
    cancel_requested  boolean     NOT NULL DEFAULT false,
    -- The host's own execution id.
    local_id          bigint,
    -- Times in ms since the epoch: requested by the control plane's database clock, started
    -- and finished as the host recorded them.
    requested_at_ms   bigint      NOT NULL,
    deliver_by        timestamptz NOT NULL,
    started_at_ms     bigint,
    finished_at_ms    bigint,
    duration_ms       bigint,
    exit_code         integer,
    signal            integer,
    detail            text,
    agent_generation  bigint,
    agent_counter     bigint,
    output_cap        bigint      NOT NULL DEFAULT 0,
    stdout_stored     bigint      NOT NULL DEFAULT 0,
    stdout_total      bigint      NOT NULL DEFAULT 0,
    stderr_stored     bigint      NOT NULL DEFAULT 0,
    stderr_total      bigint      NOT NULL DEFAULT 0
);

-- What a host claims: its invocations that are not final.
CREATE INDEX invocations_open ON invocations (host, id)
    WHERE state IN ('pending', 'delayed', 'in_progress', 'running');
CREATE INDEX invocations_by_command ON invocations (command_id, id);
CREATE INDEX invocations_by_vm ON invocations (host, vm, id);

CREATE TABLE output (
    invocation  bigint   NOT NULL REFERENCES invocations (id) ON DELETE CASCADE,
    stream      smallint NOT NULL,
    "offset"    bigint   NOT NULL,
    data        bytea    NOT NULL,
    PRIMARY KEY (invocation, stream, "offset")
);

CREATE TABLE programs (
    sha256      text        PRIMARY KEY,
    size        bigint      NOT NULL,
    data        bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    principal   text,
    peer        text        NOT NULL,
    action      text        NOT NULL,
    target      text,
    allowed     boolean     NOT NULL,
    detail      text
);
CREATE INDEX audit_by_time ON audit (at, id);

-- Whether a state counts against `max_errors`.
CREATE FUNCTION portless_is_error(state text) RETURNS boolean
    LANGUAGE sql IMMUTABLE AS $$
    SELECT state NOT IN ('pending', 'delayed', 'in_progress', 'running',
                         'succeeded', 'cancelled', 'delivery_timed_out')
$$;

CREATE FUNCTION portless_is_final(state text) RETURNS boolean
    LANGUAGE sql IMMUTABLE AS $$
    SELECT state NOT IN ('pending', 'delayed', 'in_progress', 'running')
$$;

-- Keeps a command's counters, and stops its fan-out once more than `max_errors` failed:
-- the invocations not yet claimed end `cancelled`.
CREATE FUNCTION portless_invocation_state() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    was_active boolean := OLD.state IN ('in_progress', 'running');
    is_active  boolean := NEW.state IN ('in_progress', 'running');
    d_active   integer := 0;
    d_errors   integer := 0;
    c          commands%ROWTYPE;
BEGIN
    IF NEW.state = OLD.state THEN
        RETURN NEW;
    END IF;
    IF is_active AND NOT was_active THEN
        d_active := 1;
    ELSIF was_active AND NOT is_active THEN
        d_active := -1;
    END IF;
    IF portless_is_error(NEW.state) AND NOT portless_is_final(OLD.state) THEN
        d_errors := 1;
    END IF;
    IF d_active = 0 AND d_errors = 0 THEN
        RETURN NEW;
    END IF;
    UPDATE commands SET active = active + d_active, errors = errors + d_errors
        WHERE id = NEW.command_id RETURNING * INTO c;
    IF d_errors > 0 AND c.max_errors IS NOT NULL AND c.errors > c.max_errors THEN
        UPDATE invocations SET state = 'cancelled',
            finished_at_ms = (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
            detail = format('not started: more than %s of the invocations failed (max_errors)',
                            c.max_errors)
            WHERE command_id = NEW.command_id AND state IN ('pending', 'delayed')
              AND id <> NEW.id;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER invocation_state AFTER UPDATE OF state ON invocations
    FOR EACH ROW EXECUTE FUNCTION portless_invocation_state();
