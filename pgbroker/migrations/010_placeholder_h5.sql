-- Placeholder on branch h5-costs only: migrations 010-012 are other branches'.
-- Delete this file when merging (schema.migrations() refuses gaps).
SELECT 1;
