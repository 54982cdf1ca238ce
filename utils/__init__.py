"""Shared machinery: errors, atomic files, distributed set-up, training loop, profiles, metrics and plots."""
