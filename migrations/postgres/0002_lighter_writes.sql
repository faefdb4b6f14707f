-- Lighter writes per callback.

-- A conflicting terminal is a fact about a run's events (two different terminal statuses), so it
-- is derived when read instead of stored: nothing to keep in step, and a batch of callbacks is
-- written by one statement that never has to revisit the rows it just inserted.
alter table events drop column conflicting_terminal;
alter table runs drop column conflicting_terminals;

-- A run's status changes once or twice in its life, and each change used to write a new entry
-- in every index of runs, because status was indexed. Without that index, and with room left
-- in each page, the change is a heap-only (HOT) update: one tuple, no index entries. A status
-- filter now walks the listing order (runs_seq_key) newest first; see docs/storage.md.
drop index runs_status_seq;
alter table runs set (fillfactor = 80);
