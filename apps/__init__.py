"""Applications shipped with fmtune, registered by name in the `fmtune.apps` entry points."""
