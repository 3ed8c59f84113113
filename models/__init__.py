"""Shipped bundles (package data). ``default/`` is what ``ddpm-rt --prompt`` uses."""
