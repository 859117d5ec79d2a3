"""Shared foundations below every layer: address parsing, secrets and private files, resource specs."""
