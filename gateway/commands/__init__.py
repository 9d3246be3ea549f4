"""CLI sub-command groups; each module offers `register(subparsers)`."""
