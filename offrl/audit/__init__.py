"""Dataset audit (anomaly scores, flags, duplicates, coverage, consistency) and the OOD monitor."""
