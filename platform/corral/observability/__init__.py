"""What an operator sees of the API process: a context per request (its id, the job it
concerns) that every log line carries, structured JSON logs, and Prometheus metrics on a
registry of the app's own. See docs/observability.md."""
