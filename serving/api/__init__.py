"""Thin servicers, one per proto service: validate -> decode -> run -> encode."""
