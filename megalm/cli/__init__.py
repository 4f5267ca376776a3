"""Command-line tools: each module has a `main()`; tools/<name>.py and `megalm-<name>` call it."""
