"""Classifiers behind one small interface: scores, never verdicts."""
