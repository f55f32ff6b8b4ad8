"""Upstream LLM providers behind one small interface (see ``base``)."""
