-- How a callback batch learns which runs it moved, inside its one statement: `on conflict do
-- update ... returning` sees only the row as the update left it, so the update also keeps the
-- rank the run had just before it (the latest committed row, read under the row lock). A batch
-- moved a run when it created it (this stays null) or when status_rank rose above this. Only
-- that batch's own `returning` reads it: what another writer leaves here means nothing.
-- Without a default, adding the column rewrites nothing.
alter table runs add column previous_status_rank smallint;
