-- Version 2: pushes by reference. A program is uploaded once (stored by SHA-256 in
-- `programs`); a push is a command whose invocations carry the program's reference, and each
-- host fetches the program once (recorded in `program_fetches`), then pushes it to its VMs.

ALTER TABLE commands ADD COLUMN program text REFERENCES programs (sha256);
ALTER TABLE commands ADD COLUMN program_name text;
ALTER TABLE commands ADD COLUMN run boolean NOT NULL DEFAULT false;

ALTER TABLE invocations ADD COLUMN program text REFERENCES programs (sha256);
ALTER TABLE invocations ADD COLUMN program_name text;
ALTER TABLE invocations ADD COLUMN run boolean NOT NULL DEFAULT false;

CREATE TABLE program_fetches (
    host        text        NOT NULL,
    sha256      text        NOT NULL REFERENCES programs (sha256),
    fetched_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX program_fetches_by_program ON program_fetches (sha256, host);
