"""The configuration: its schema (schema.py), loading and messages (load.py, echo.py), and redaction (redact.py)."""
