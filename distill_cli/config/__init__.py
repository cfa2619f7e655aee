"""Composition-time pieces: where the configs live, the resolvers they use (registered here, so
any composition of them — the CLI's, a test's — can resolve them), the allow-listed
`instantiate`."""
from distill_cli.config.resolvers import register as _register_resolvers

_register_resolvers()
