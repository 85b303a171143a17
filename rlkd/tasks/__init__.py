"""Built-in task suites: deterministic generators of instruction rows in rlkd's JSONL format."""
