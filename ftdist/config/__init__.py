"""The configuration: its schema (schema.py), loading and messages (load.py, echo.py), redaction
(redact.py), and the batch plan its numbers make (plan.py)."""
