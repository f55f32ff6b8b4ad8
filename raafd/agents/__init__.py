"""Agents: the run loop, tools, handoffs."""
