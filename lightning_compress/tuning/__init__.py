"""The tuning half: search studies over LightningCLI configs (``sweep``), the Tuner through the CLI
(``tune``) and per-layer sensitivity scans (``sensitivity``)."""
