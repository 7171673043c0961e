//! HRL logs: the per-disk change log format (see `docs/hrl-format.md`).
