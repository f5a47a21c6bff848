-- 010: a placeholder in branch h2-sessions-errors, which was given number
-- 011 while another branch adds 010 (migrations must have no gaps). Drop
-- this file when the branches are merged.
SELECT 1;
