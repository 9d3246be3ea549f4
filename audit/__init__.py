"""Audit log (hash chain, signed checkpoints, exports, erasable prompts) and C2PA provenance; see README.md."""
