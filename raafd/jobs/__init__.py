"""Durable background jobs and batches: the model's rules (:mod:`.model`), the service that
queues, schedules and runs them as streams (:mod:`.service`), and signed callbacks."""

from raafd.jobs.service import Jobs, StreamStarter, describe, public_batch

__all__ = ["Jobs", "StreamStarter", "describe", "public_batch"]
