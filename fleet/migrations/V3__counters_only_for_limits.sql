-- Version 3: a command's counters are kept only when it has a limit. An unlimited fan-out's
-- invocations then change state without touching their command's row, so that the claims
-- and reports of a thousand hosts do not queue behind one row lock. What the counters would
-- say is counted from the invocations when asked for.

ALTER TABLE invocations ADD COLUMN limited boolean NOT NULL DEFAULT true;

CREATE OR REPLACE FUNCTION portless_invocation_state() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    was_active boolean := OLD.state IN ('in_progress', 'running');
    is_active  boolean := NEW.state IN ('in_progress', 'running');
    d_active   integer := 0;
    d_errors   integer := 0;
    c          commands%ROWTYPE;
BEGIN
    IF NEW.state = OLD.state OR NOT NEW.limited THEN
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
