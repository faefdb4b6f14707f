-- Unfinished runs (status_rank 0 submitted, 1 processing; 2 is terminal), for stuck runs:
-- GET /v1/runs?stuck=true walks it backwards by seq (the listing order), filtering on
-- updated_at without reading the table, and the nen_relay_runs_stuck gauge counts through it.
-- Partial: a healthy service has few unfinished runs however many it keeps, so both cost what
-- the unfinished runs do. Queries must say `status_rank < 2` word for word to use it.
create index runs_unfinished on runs (seq, updated_at) where status_rank < 2;
