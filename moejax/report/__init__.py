"""Figures and the written report of a routing analysis."""
