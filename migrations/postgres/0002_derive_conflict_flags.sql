-- A conflicting terminal is a fact about a run's events (two different terminal statuses), so it
-- is derived when read instead of stored: nothing to keep in step, and a batch of callbacks is
-- written by one statement that never has to revisit the rows it just inserted.
alter table events drop column conflicting_terminal;
alter table runs drop column conflicting_terminals;
