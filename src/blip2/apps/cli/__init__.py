"""The `blip2` command."""
